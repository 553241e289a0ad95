"""The fused chunked linear + cross-entropy equals the plain computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fpm.models.losses import linear_cross_entropy


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [64, 512])  # several chunks (the last one partial), and a single one
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_cross_entropy_and_its_gradients(dtype, tol, chunk, with_bias):
    torch.manual_seed(0)
    n, d, v = 300, 32, 1000
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (0.1 * torch.randn(v, d)).to(dtype).requires_grad_(True)
    b = torch.randn(v).to(dtype).requires_grad_(True) if with_bias else None
    y = torch.randint(0, v, (n,))
    y[::7] = -100  # ignored positions
    leaves = (h, w) + ((b,) if with_bias else ())
    ref = F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=-100)
    want = torch.autograd.grad(3.0 * ref, leaves)
    got = linear_cross_entropy(h, w, y, chunk=chunk, bias=b)
    have = torch.autograd.grad(3.0 * got, leaves)
    assert got.item() == pytest.approx(ref.item(), rel=tol)
    for g_have, g_want in zip(have, want):
        assert torch.allclose(g_have.float(), g_want.float(), atol=tol * g_want.abs().max().item())


def test_eager_fallback_gives_the_same_result(monkeypatch):
    import fpm.models.losses as L

    torch.manual_seed(1)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(200, 16, requires_grad=True)
    y = torch.randint(0, 200, (50,))
    compiled = L.linear_cross_entropy(h, w, y, chunk=16)
    monkeypatch.setattr(L, "_COMPILED", L._chunk_grad)
    eager = L.linear_cross_entropy(h, w, y, chunk=16)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)


def test_no_scored_rows_gives_zero_loss_and_zero_gradients():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    b = torch.zeros(20, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), bias=b)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0
