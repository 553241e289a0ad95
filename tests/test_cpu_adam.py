"""fpm's CPU AdamW resumes bit for bit; DeepSpeed's own does not (issue 16)."""

from __future__ import annotations

import pytest

import copy

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from fpm.cpu.adam import ResumableCPUAdam


def _train(cls, grads, resume_at=None):
    """Parameters after len(grads) steps; with ``resume_at``, rebuilt from a state dict at that step."""
    def make(w):
        p = torch.nn.Parameter(w.clone())
        return p, cls([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True, weight_decay=0.01)

    p, opt = make(torch.linspace(-1, 1, grads[0].numel()))
    for i, g in enumerate(grads):
        if i == resume_at:
            state = copy.deepcopy(opt.state_dict())
            p, opt = make(p.detach())
            opt.load_state_dict(state)
        p.grad = g
        opt.step()
    return p.detach()


@pytest.mark.e2e
def test_a_resumed_run_takes_the_same_steps_as_an_uninterrupted_one():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4096, generator=g) for _ in range(40)]
    assert torch.equal(_train(ResumableCPUAdam, grads), _train(ResumableCPUAdam, grads, resume_at=20))
    # DeepSpeed's multiplies beta^t up step by step and recomputes it with pow() after a resume
    assert not torch.equal(_train(DeepSpeedCPUAdam, grads), _train(DeepSpeedCPUAdam, grads, resume_at=20))
    # and both are the same AdamW: they agree to float rounding
    assert torch.allclose(_train(ResumableCPUAdam, grads), _train(DeepSpeedCPUAdam, grads), atol=1e-6)
