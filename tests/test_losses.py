"""The fused chunked linear + cross-entropy equals the plain computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fpm.models.losses import linear_cross_entropy


def linear(w: torch.Tensor, b: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear whose parameters are the given leaf tensors."""
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    layer.weight = nn.Parameter(w)
    if b is not None:
        layer.bias = nn.Parameter(b)
    return layer


@pytest.mark.parametrize("dtype, tol, transposed", [(torch.float32, 1e-5, False), (torch.bfloat16, 2e-2, False),
                                                (torch.bfloat16, 2e-2, True)])
@pytest.mark.parametrize("chunk", [64, 512])  # several chunks (the last one partial), and a single one
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_cross_entropy_and_its_gradients(dtype, tol, transposed, chunk, with_bias, monkeypatch):
    import fpm.models.losses as L

    # the transposed-weight path (16-bit CPU, many rows: GPT) taken here for 300 rows as well, or
    # (transposed=False) the transposed-gradient path of 16-bit CPU with few rows
    monkeypatch.setattr(L, "TRANSPOSED_MIN_ROWS", 0 if transposed else 10**9)
    calls, transpose = [], L.kernels.transpose
    monkeypatch.setattr(L.kernels, "transpose", lambda x, ones_row=False: calls.append(tuple(x.shape)) or transpose(x, ones_row))
    torch.manual_seed(0)
    n, d, v = 300, 32, 1000
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (0.1 * torch.randn(v, d)).to(dtype).requires_grad_(True)
    b = torch.randn(v).to(dtype).requires_grad_(True) if with_bias else None
    y = torch.randint(0, v, (n,))
    y[::7] = -100  # ignored positions
    layer = linear(w, b)
    leaves = (h, layer.weight) + ((layer.bias,) if with_bias else ())
    ref = F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=-100)
    want = torch.autograd.grad(3.0 * ref, (h, w) + ((b,) if with_bias else ()))
    got = linear_cross_entropy(h, layer, y, chunk=chunk)
    have = torch.autograd.grad(3.0 * got, leaves)
    assert got.item() == pytest.approx(ref.item(), rel=tol)
    assert ((v, d) in calls) == transposed  # the many-rows path multiplies by a transposed W
    # in 16 bits with few rows (BERT's masked positions) the logits' gradient is transposed instead
    assert ((min(chunk, n), v) in calls) == (dtype == torch.bfloat16 and not transposed)
    assert bool(calls) == (dtype == torch.bfloat16)
    for g_have, g_want in zip(have, want):
        assert torch.allclose(g_have.float(), g_want.float(), atol=tol * g_want.abs().max().item())


def test_eager_fallback_gives_the_same_result(monkeypatch):
    import fpm.models.losses as L

    torch.manual_seed(1)
    h = torch.randn(50, 16, requires_grad=True)
    layer = nn.Linear(16, 200)
    y = torch.randint(0, 200, (50,))
    compiled = L.linear_cross_entropy(h, layer, y, chunk=16)
    monkeypatch.setattr(L, "_COMPILED", L._chunk_grad)
    eager = L.linear_cross_entropy(h, layer, y, chunk=16)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)


def test_no_scored_rows_gives_zero_loss_and_zero_gradients():
    h = torch.randn(0, 8, requires_grad=True)
    layer = nn.Linear(8, 20)
    loss = linear_cross_entropy(h, layer, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(layer.weight.grad) == 0 and torch.count_nonzero(layer.bias.grad) == 0


def test_without_gradients_it_gives_the_plain_loss():
    layer = nn.Linear(8, 20)
    h, y = torch.randn(5, 8), torch.randint(0, 20, (5,))
    with torch.no_grad():
        got = linear_cross_entropy(h, layer, y)
        assert got.item() == pytest.approx(F.cross_entropy(layer(h), y).item(), rel=1e-6)


def _scaled_grads(fn, h, w, bias, scale):
    h = h.detach().clone().requires_grad_()
    layer = linear(w.detach().clone(), None if bias is None else bias.detach().clone())
    (fn(h, layer) * scale).backward()
    gb = None if bias is None else layer.bias.grad.float() / scale
    return h.grad.float() / scale, layer.weight.grad.float() / scale, gb


def test_fp16_gradients_under_a_loss_scale_match_the_stock_path():
    # issue 16: with 2,048 rows of GPT-2's vocabulary, (softmax - onehot) / N is below fp16's smallest
    # subnormal for most entries; formed before the loss scale arrives, 96% of the output layer's
    # weight gradient was exactly zero. Float16 arithmetic on the CPU, 2^16 scale, fp32 reference.
    from fpm.models.losses import _LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    n, d, vocab, scale = 2048, 8, 50257, 2.0 ** 16
    h = torch.randn(n, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.02
    b = torch.randn(vocab, generator=g) * 0.02
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::7] = -100  # ignored positions
    ref = _scaled_grads(lambda h, m: F.cross_entropy(m(h), y), h, w, b, scale)
    half = (h.half(), w.half(), b.half())
    stock = _scaled_grads(lambda h, m: F.cross_entropy(m(h).float(), y), *half, scale)
    fused = _scaled_grads(lambda h, m: linear_cross_entropy(h, m, y, chunk=512), *half, scale)

    def rel(a, r):
        return float((a - r).norm() / r.norm())

    for i in range(3):  # hidden states, weight, bias
        assert rel(fused[i], ref[i]) <= 1.5 * rel(stock[i], ref[i]) + 1e-6, i
    assert float((fused[1] == 0).float().mean()) <= 1e-4
    # the forward-formed gradient (the old fp16 path, still bf16's and fp32's) fails exactly this check
    old = _scaled_grads(lambda h, m: _LinearCrossEntropy.apply(h, m.weight, m.bias, y, 512), *half, scale)
    assert float((old[1] == 0).float().mean()) > 0.5 and rel(old[0], ref[0]) > 3 * rel(stock[0], ref[0])
