"""Recipe → DeepSpeed configuration (a plain dict, also written to the run directory): the one
place it is derived, from the recipe's own ``deepspeed:`` and ``train.loss_scale:`` sections."""

from __future__ import annotations

from fpm.config.schema import DeepSpeedCfg, LossScaleCfg


def deepspeed_config(*, global_batch: int, micro_batch: int, grad_accum: int, grad_clip: float, precision: str,
                     deepspeed: DeepSpeedCfg, loss_scale: LossScaleCfg | None = None) -> dict:
    """DeepSpeed's configuration. Every key of the recipe's ``deepspeed:`` section is passed on
    (``allgather_bucket_size`` is used by ZeRO-1/2 only; the others by every stage above 0). Under
    ZeRO, bf16 gradients accumulate across micro-batches in fp32 (``data_types.grad_accum_dtype``;
    DeepSpeed's default accumulates them in bf16)."""
    zero, loss_scale = deepspeed, loss_scale or LossScaleCfg()
    section: dict = {"stage": zero.zero_stage, "overlap_comm": zero.overlap_comm,
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
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16" and zero.zero_stage > 0:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if precision == "fp16":
        cfg["fp16"].update(loss_scale=0,  # 0 = dynamic
                           initial_scale_power=loss_scale.initial_scale_power,
                           loss_scale_window=loss_scale.loss_scale_window,
                           hysteresis=loss_scale.hysteresis,
                           min_loss_scale=loss_scale.min_loss_scale)
    return cfg
