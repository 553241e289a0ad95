"""DeepSpeed's CPU AdamW, made to resume bit for bit.

``DeepSpeedCPUAdam`` keeps Adam's bias-correction powers β₁ᵗ and β₂ᵗ inside its C++ optimizer
object and, from one step to the next, multiplies them by β once more (in float); only when a step
number arrives out of sequence does it compute ``pow(β, t)`` afresh. A run resumed from a
checkpoint therefore starts from ``pow`` while the uninterrupted run carries the product of t
roundings: the two differ in the last bits of the update (measured: 2.4e-7 after 20 steps of a
4,096-element tensor) and the losses drift apart a few steps after every resume — found as a
resumed ``fpm pretrain`` logging 6.5229182 where the uninterrupted run logged 6.5229173.

:class:`ResumableCPUAdam` puts the C++ optimizer's step counter at 0 (an update of no elements)
before each step, so every step computes ``pow(β, t)`` from its step number alone, whatever came
before. Same update as DeepSpeed's otherwise; same state layout, so checkpoints do not change.
"""

from __future__ import annotations

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam


class ResumableCPUAdam(DeepSpeedCPUAdam):
    @staticmethod
    def load_op():
        """Build (JIT, cached) and load the C++ op; raises where it cannot be built."""
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return CPUAdamBuilder().load()

    def _restart_powers(self) -> None:
        """An update of zero elements at step 0: the C++ side sets β^0 = 1 and its counter to 0, so
        the next real step t recomputes β^t (t = 1: 1 * β, exactly pow(β, 1))."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        empty = torch.empty(0)
        self.ds_opt_adam.adam_update(self.opt_id, 0, group["lr"], beta1, beta2, group["eps"],
                                     group["weight_decay"], group["bias_correction"], empty, empty, empty, empty)

    @torch.no_grad()
    def step(self, closure=None):
        self._restart_powers()
        return super().step(closure)
