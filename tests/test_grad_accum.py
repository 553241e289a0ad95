"""bf16 gradients summed in fp32 across micro-batches (fpm.engine.grad_accum) against a hand sum."""

from __future__ import annotations

import torch
from torch import nn

from fpm.engine.grad_accum import Fp32Accumulation

MICRO = 16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).to(torch.bfloat16)


def _batches():
    g = torch.Generator().manual_seed(1)
    # micro-batches of very different scale: late small terms are what a bf16 running sum drops
    return [(torch.randn(4, 64, generator=g) * (4.0 if i == 0 else 0.25)).to(torch.bfloat16) for i in range(MICRO)]


def _micro_grads(model: nn.Module, batches) -> list[list[torch.Tensor]]:
    """Each micro-batch's own bf16 gradient, computed alone."""
    out = []
    for x in batches:
        model.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


def test_the_step_gradient_is_the_fp32_sum_of_the_micro_batches_rounded_once():
    model, batches = _model(), _batches()
    per_micro = _micro_grads(model, batches)
    want = [torch.stack([g[i].float() for g in per_micro]).sum(0).to(torch.bfloat16)
            for i in range(len(per_micro[0]))]
    exact = [torch.stack([g[i].double() for g in per_micro]).sum(0) for i in range(len(per_micro[0]))]

    # autograd's own accumulation, in bf16: what DeepSpeed does without ZeRO
    for x in batches:
        model(x).float().pow(2).mean().backward()
    naive = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    boundary = {"now": False}
    acc = Fp32Accumulation(model.parameters(), lambda: boundary["now"])
    for i in range(MICRO):
        boundary["now"] = i == MICRO - 1
        model(batches[i]).float().pow(2).mean().backward()
        if i < MICRO - 1:  # between micro-batches the sum lives in fp32, not in .grad
            assert all(p.grad is None for p in model.parameters())
    got = [p.grad for p in model.parameters()]
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # and the test can tell the two apart: the bf16 running sum is further from the exact sum
    err = lambda gs: max(float((g.double() - e).norm() / e.norm()) for g, e in zip(gs, exact))  # noqa: E731
    print(f"relative error: bf16 running sum {err(naive):.2e}, fp32 sum rounded once {err(got):.2e}")
    assert err(naive) > 3 * err(got)
    # the next step (after the optimizer's zero_grad) starts from zero
    model.zero_grad(set_to_none=True)
    boundary["now"] = True
    model(batches[3]).float().pow(2).mean().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), per_micro[3]))
    acc.remove()


def test_a_parameter_used_only_before_the_last_micro_batch_still_gets_its_sum():
    a, b = nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8).to(torch.bfloat16)
    params = [*a.parameters(), *b.parameters()]
    boundary = {"now": False}
    Fp32Accumulation(params, lambda: boundary["now"])
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    b(x).float().sum().backward()  # micro-batch 1 uses b only
    boundary["now"] = True
    a(x).float().sum().backward()  # the last uses a only
    assert all(p.grad is not None for p in params)
    want = torch.full((8,), 2.0, dtype=torch.bfloat16)  # d(sum)/d(bias) over a batch of two
    assert torch.equal(a.bias.grad, want) and torch.equal(b.bias.grad, want)


def test_fp32_parameters_are_left_to_autograd():
    model = nn.Linear(4, 4)
    acc = Fp32Accumulation(model.parameters(), lambda: False)
    model(torch.ones(1, 4)).sum().backward()
    assert acc.params == [] and model.weight.grad is not None
