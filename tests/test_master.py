"""fpm's flat fp32 master weights for bf16 training (fpm.cpu.master) against plain fp32 AdamW."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fpm.cpu.master import MasterWeightCPUAdam
from fpm.engine.schedule import param_groups


@pytest.fixture(autouse=True, params=["fused", "deepspeed"])
def path(request, monkeypatch):
    """Every test on both paths: fpm's fused C++ step and DeepSpeed's CPU Adam on fp32 copies."""
    if request.param == "deepspeed":
        import fpm.cpu.kernels

        monkeypatch.setattr(fpm.cpu.kernels, "extension", lambda: None)
    else:
        from fpm.cpu.kernels import extension

        assert extension() is not None
    return request.param


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def _grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)


def test_steps_match_fp32_adamw_on_the_master_copy_and_round_into_the_model(path):
    ref = _model()
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.01), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    model = _model().to(torch.bfloat16)
    master_init = [p.detach().float().clone() for p in model.parameters()]
    with torch.no_grad():  # the reference starts from the same (bf16-rounded) weights
        for p, m in zip(ref.parameters(), master_init):
            p.copy_(m)
    opt = MasterWeightCPUAdam(param_groups(model, 0.01), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    assert (opt._fused is not None) == (path == "fused")
    for step in range(3):
        _grads(ref, step)
        _grads(model, step)
        with torch.no_grad():  # the reference sees the same bf16-rounded gradients
            for p in ref.parameters():
                p.grad = p.grad.to(torch.bfloat16).float()
        ref_opt.step()
        opt.step()
    masters = torch.cat([g["params"][0] for g in opt.param_groups])
    want = torch.cat([p.detach().reshape(-1) for grp in param_groups(ref, 0.01) for p in grp["params"]])
    assert torch.allclose(masters, want, atol=1e-6, rtol=1e-5)
    rounded = torch.cat([p.detach().reshape(-1) for grp in param_groups(model, 0.01) for p in grp["params"]])
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, masters.detach().to(torch.bfloat16))  # the model holds the rounded master


def test_clips_to_max_norm_and_reports_the_norm_before_clipping():
    model = _model().to(torch.bfloat16)
    ref = _model().to(torch.bfloat16).float()  # the same weights, in fp32, for torch's AdamW
    opt = MasterWeightCPUAdam(param_groups(model, 0.0), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=0.5)
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.0), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    for step in range(3):  # Adam is invariant to a constant gradient scale: clip differently each step
        _grads(model, step)
        for p, r in zip(model.parameters(), ref.parameters()):
            p.grad = (p.grad.float() * (step + 1)).to(torch.bfloat16)
            r.grad = p.grad.float()  # both see the same bf16 gradients
        norm = math.sqrt(sum(float(r.grad.pow(2).sum()) for r in ref.parameters()))
        assert norm > 0.5
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        ref_opt.step()
        assert opt._global_grad_norm == pytest.approx(norm, rel=1e-5)
    masters = torch.cat([g["params"][0] for g in opt.param_groups])
    want = torch.cat([p.detach().reshape(-1) for grp in param_groups(ref, 0.0) for p in grp["params"]])
    assert torch.allclose(masters, want, atol=1e-6, rtol=1e-5)


def test_non_finite_gradients_skip_the_step():
    model = _model().to(torch.bfloat16)
    opt = MasterWeightCPUAdam(param_groups(model, 0.0), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    _grads(model, 2)
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.step()
    assert opt.overflow
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    _grads(model, 3)
    opt.step()
    assert not opt.overflow
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_state_dict_round_trip_restores_master_weights_and_moments():
    model = _model().to(torch.bfloat16)
    opt = MasterWeightCPUAdam(param_groups(model, 0.01), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    for step in range(2):
        _grads(model, step)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # as DeepSpeed's checkpoint does
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    twin = _model(seed=5).to(torch.bfloat16)  # different weights: the state dict must overwrite them
    twin_opt = MasterWeightCPUAdam(param_groups(twin, 0.01), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    twin_opt.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    _grads(model, 9)
    _grads(twin, 9)
    opt.step()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
