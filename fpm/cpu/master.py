"""bf16 weights with fp32 master weights, in flat buffers, for a CPU-only ZeRO-0 run.

DeepSpeed's bf16 mode without ZeRO wraps the optimizer in ``FP16_UnfusedOptimizer``, which walks
the parameters one at a time: an overflow check, a norm and an fp32 copy of every gradient, an
unscale, an Adam call and a copy back per tensor — ~1,000 small kernels per step, 110-125 ms of a
~900 ms step on the BERT shape of ``bench/train_throughput.py`` (its ZeRO-1/2 optimizers measured
no faster on one CPU process). :class:`MasterWeightCPUAdam` keeps the fp32 master weights, their
gradients and the Adam moments of each parameter group in one flat tensor, so clipping is one norm
and DeepSpeed's fused CPU AdamW runs once per group over all of them. DeepSpeed still runs the
training (gradient accumulation, all-reduce across data-parallel ranks, checkpoints, the LR
scheduler); it is configured without its own bf16 wrapper and with clipping left to this class.

Where fpm's C++ kernels are built (fpm.cpu.kernels), the step is two passes over memory instead
of five: the norm straight from the bf16 gradients, then one fused AdamW that reads the bf16
gradients, applies the clipping factor in registers, updates the fp32 master weights and moments
and writes the rounded bf16 weights back (``adamw16`` in csrc/cpu_kernels.cpp; the same update as
``torch.optim.AdamW``). Measured on 35.3M parameters: 23 ms against 53 ms for copy, norm, clip,
DeepSpeed's CPU Adam and write-back. The optimizer state keeps DeepSpeed's CPU-Adam layout
(``step``, ``exp_avg``, ``exp_avg_sq`` per flat tensor), so checkpoints are the same either way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fpm.cpu.adam import ResumableCPUAdam


class MasterWeightCPUAdam(ResumableCPUAdam):
    """AdamW on flat fp32 master copies of low-precision model parameters.

    ``groups`` are the model's parameter groups (bf16 tensors; ``weight_decay`` per group). Each
    step copies the model's gradients into the flat fp32 gradient, clips it to ``max_grad_norm``
    (0 = no clipping), skips the update when the norm is not finite (as DeepSpeed's bf16 optimizer
    does), runs AdamW, and writes the rounded master weights back into the model parameters.
    """

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                 max_grad_norm: float = 0.0):
        self.model_groups: list[list[nn.Parameter]] = []
        master_groups = []
        for group in groups:
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            master = nn.Parameter(flat)
            self.model_groups.append(params)
            master_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [master]})
        super().__init__(master_groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
        from fpm.cpu.kernels import extension

        kernels = extension()
        self._fused = kernels if kernels is not None and all(
            p.dtype == torch.bfloat16 for params in self.model_groups for p in params) and all(
            group.get("bias_correction", True) for group in self.param_groups) else None
        # per group: (model parameters, their slices of the flat master weights, of the flat gradient);
        # the flat tensors are only ever updated in place, so the views stay valid
        self._views = []
        for params, group in zip(self.model_groups, self.param_groups):
            master, sizes = group["params"][0], [p.numel() for p in params]
            if self._fused is None:  # fp32 gradients for DeepSpeed's CPU Adam
                master.grad = torch.zeros_like(master)
            self._views.append((params, master.split(sizes), master.grad.split(sizes) if master.grad is not None
                                else None))
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm = 0.0

    def _write_back(self) -> None:
        """Round the master weights into the model's parameters."""
        for params, weights, _ in self._views:
            for p, w in zip(params, weights):
                p.copy_(w.view_as(p))

    @torch.no_grad()
    def step(self, closure=None):
        if self._fused is not None:
            return self._fused_step()
        sq = 0.0
        for (params, _, grads), group in zip(self._views, self.param_groups):
            for p, g in zip(params, grads):
                if p.grad is None:
                    g.zero_()
                else:
                    g.copy_(p.grad.reshape(-1))
            flat = group["params"][0].grad
            sq += float(torch.dot(flat, flat))
        coef = self._clip_coef(sq)
        if coef is None:
            return None
        if coef != 1.0:
            for group in self.param_groups:
                group["params"][0].grad.mul_(coef)
        super().step()
        self._write_back()
        return None

    def _clip_coef(self, sq: float) -> float | None:
        """Records the norm; the factor to scale gradients by, or ``None`` to skip the step."""
        norm = math.sqrt(sq) if math.isfinite(sq) else float("nan")
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            return None
        return self.max_grad_norm / (norm + 1e-6) if self.max_grad_norm > 0 and norm > self.max_grad_norm else 1.0

    def _fused_step(self) -> None:
        grads = [[p.grad.contiguous() if p.grad is not None else torch.zeros_like(p) for p in params]
                 for params in self.model_groups]
        coef = self._clip_coef(sum(self._fused.sumsq16(g) for g in grads))
        if coef is None:
            return None
        for params, g, group in zip(self.model_groups, grads, self.param_groups):
            master = group["params"][0]
            state = self.state[master]
            if not state:  # DeepSpeedCPUAdam's layout, so checkpoints are the same on either path
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(master.data)
                state["exp_avg_sq"] = torch.zeros_like(master.data)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            self._fused.adamw16(master.data, state["exp_avg"], state["exp_avg_sq"], g, [p.data for p in params],
                                group["lr"], beta1, beta2, group["eps"], group["weight_decay"], state["step"], coef)
        return None

    def zero_grad(self, set_to_none: bool = True):
        for params in self.model_groups:
            for p in params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self):
        sd = super().state_dict()
        sd["master_weights"] = [group["params"][0].detach() for group in self.param_groups]
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for group, saved in zip(self.param_groups, masters):
                group["params"][0].copy_(saved)
            self._write_back()
