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

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam


def _machine_key() -> str:
    """What identifies this machine's CPU for compile flags: model names and flags of
    /proc/cpuinfo (not its clock readings), the architecture and the processor count."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = sorted({line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")})
    text = "\n".join([os.uname().machine, str(os.cpu_count()), *keep])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_cpu_info() -> None:
    """py-cpuinfo's ``get_cpu_info`` runs a Python subprocess (about a second here), and DeepSpeed's
    op builder calls it twice for every op it loads, in every process. The answer is a property of
    the machine: keep it in memory and in a file beside the JIT-built ops, keyed by the CPU."""
    import cpuinfo

    if getattr(cpuinfo.get_cpu_info, "fpm_cached", False):
        return
    original = cpuinfo.get_cpu_info
    from fpm.cpu.build import extensions_dir

    cache_dir = extensions_dir()

    @functools.lru_cache(maxsize=1)
    def get_cpu_info():
        path = cache_dir / f"fpm-cpuinfo-{_machine_key()}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        info = original()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)
        except OSError:  # a read-only cache: the answer is still kept in memory
            pass
        return info

    get_cpu_info.fpm_cached = True
    cpuinfo.get_cpu_info = get_cpu_info


class ResumableCPUAdam(DeepSpeedCPUAdam):
    @staticmethod
    def load_op():
        """Build (JIT, cached) and load the C++ op; raises where it cannot be built."""
        from deepspeed.ops.op_builder import CPUAdamBuilder

        from fpm.cpu.build import guarded

        cache_cpu_info()
        builder = CPUAdamBuilder()
        with guarded(builder.name):  # DeepSpeed JIT-builds it with torch's lock file: see fpm.cpu.build
            return builder.load()

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
