"""Recipe → DeepSpeed configuration (a plain dict, also written to the run directory)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Precision:
    kind: str  # fp32 | bf16 | fp16
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass
class ZeroSettings:
    """The ``deepspeed:`` section of a recipe, as DeepSpeed's ``zero_optimization`` takes it."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000

    @classmethod
    def of(cls, section) -> ZeroSettings:
        """From a recipe's ``deepspeed:`` section (every key, by name)."""
        return cls(stage=section.zero_stage, offload_optimizer=section.offload_optimizer,
                   offload_params=section.offload_params, overlap_comm=section.overlap_comm,
                   contiguous_gradients=section.contiguous_gradients,
                   reduce_bucket_size=section.reduce_bucket_size, allgather_bucket_size=section.allgather_bucket_size)


def deepspeed_config(*, global_batch: int, micro_batch: int, grad_accum: int, grad_clip: float,
                     precision: Precision, zero: ZeroSettings | None = None) -> dict:
    """DeepSpeed's configuration. Every key of the recipe's ``deepspeed:`` section is passed on
    (``allgather_bucket_size`` is used by ZeRO-1/2 only; the others by every stage above 0). Under
    ZeRO, bf16 gradients accumulate across micro-batches in fp32 (``data_types.grad_accum_dtype``;
    DeepSpeed's default accumulates them in bf16)."""
    zero = zero or ZeroSettings()
    section: dict = {"stage": zero.stage, "overlap_comm": zero.overlap_comm,
                     "contiguous_gradients": zero.contiguous_gradients,
                     "reduce_bucket_size": zero.reduce_bucket_size,
                     "allgather_bucket_size": zero.allgather_bucket_size}
    if zero.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": section,
        "bf16": {"enabled": precision.kind == "bf16"},
        "fp16": {"enabled": precision.kind == "fp16"},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision.kind == "bf16" and zero.stage > 0:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if precision.kind == "fp16":
        cfg["fp16"].update(loss_scale=0,  # 0 = dynamic
                           initial_scale_power=precision.initial_scale_power,
                           loss_scale_window=precision.loss_scale_window,
                           hysteresis=precision.hysteresis,
                           min_loss_scale=precision.min_loss_scale)
    return cfg
