"""What the engine is told, built from a recipe in one place: :class:`TrainSpec`, and the two
functions that make it from a pretraining and a fine-tuning recipe. Every ``train.*`` and
``deepspeed.*`` key of a recipe takes effect here or is passed on from here
(tests/test_recipe_keys.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fpm.config.schema import DeepSpeedCfg, LossScaleCfg, derive_batch
from fpm.errors import FpmError

# fine-tuning's optimizer: the Hugging Face GLUE example's AdamW and linear schedule
FINETUNE_BETAS, FINETUNE_EPS, FINETUNE_SCHEDULE = (0.9, 0.999), 1e-8, "linear"


@dataclass
class TrainSpec:
    """The engine's settings: the recipe's ``train`` keys the loop reads, and its ``deepspeed`` and
    ``loss_scale`` sections as they are."""

    max_steps: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    lr: float
    min_lr: float
    warmup_steps: int
    schedule: str
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float
    precision: str  # fp32 | bf16 | fp16 (train.precision, resolved from auto)
    deepspeed: DeepSpeedCfg  # the recipe's deepspeed: section itself (fpm.engine.ds_config reads it)
    loss_scale: LossScaleCfg = field(default_factory=LossScaleCfg)  # the recipe's train.loss_scale: (fp16)
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    max_nonfinite_steps: int = 20
    seed: int = 1234
    flops_per_token: float = 0.0
    num_workers: int = 1
    activation_checkpointing: bool = True
    compile: bool = False
    eval_every: int = 0  # validation every this many steps and at the end (0: none)
    eval_batches: int = 10  # global batches of the validation part scored each time
    spike_factor: float = 0.0  # the loss-spike guard (fpm.engine.spikes); 0: off
    spike_window: int = 100
    spike_rollback: int = 3
    hang_timeout_s: float = 1800.0  # the hang watchdog (fpm.engine.watchdog); 0: off
    hang_factor: float = 50.0
    async_save: bool | None = None  # checkpoints written in the background (fpm.engine.async_save); None: on a GPU
    peak_tflops: float | None = None  # the device's peak for MFU, given (train.peak_tflops); None: measured


def pretraining_spec(recipe, world_size: int, flops_per_token: float) -> TrainSpec:
    """The engine's settings for pretraining ``recipe`` on ``world_size`` data-parallel ranks."""
    t = recipe.train
    try:
        g, b, a = derive_batch(t.global_batch, t.micro_batch, t.grad_accum, world_size)
    except ValueError as exc:
        raise FpmError(f"train batch: {exc}") from None
    return TrainSpec(
        max_steps=t.max_steps, global_batch=g, micro_batch=b, grad_accum=a, lr=t.lr, min_lr=t.min_lr,
        warmup_steps=t.warmup_steps, schedule=t.schedule, weight_decay=t.weight_decay,
        betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, grad_clip=t.grad_clip,
        precision=t.precision, deepspeed=recipe.deepspeed, loss_scale=t.loss_scale,
        log_every=t.log_every, save_every=t.save_every,
        keep_last=t.keep_last, max_nonfinite_steps=t.max_nonfinite_steps, seed=t.seed,
        eval_every=t.eval_every, eval_batches=t.eval_batches,
        spike_factor=t.spike_factor, spike_window=t.spike_window, spike_rollback=t.spike_rollback,
        hang_timeout_s=t.hang_timeout_s, hang_factor=t.hang_factor, async_save=t.async_save,
        flops_per_token=flops_per_token, num_workers=recipe.data.num_workers,
        activation_checkpointing=t.activation_checkpointing, compile=t.compile, peak_tflops=t.peak_tflops)


def finetuning_spec(recipe, world_size: int, n_train: int) -> TrainSpec:
    """The engine's settings for fine-tuning ``recipe`` on ``n_train`` training examples:
    ``train.max_steps`` optimizer steps, else ``train.epochs`` over the examples; the dev
    evaluation every ``train.eval_every`` steps."""
    t = recipe.train
    if t.batch_size % world_size:
        raise FpmError(f"train.batch_size={t.batch_size} is not divisible by {world_size} processes")
    steps = t.max_steps or max(1, math.ceil(t.epochs * n_train / t.batch_size))
    return TrainSpec(max_steps=steps, global_batch=t.batch_size, micro_batch=t.batch_size // world_size,
                     grad_accum=1, lr=t.lr, min_lr=0.0, warmup_steps=int(t.warmup_ratio * steps),
                     schedule=FINETUNE_SCHEDULE, weight_decay=t.weight_decay, betas=FINETUNE_BETAS, eps=FINETUNE_EPS,
                     grad_clip=t.grad_clip, precision=t.precision, deepspeed=recipe.deepspeed,
                     log_every=t.log_every, save_every=t.save_every, keep_last=t.keep_last, seed=t.seed,
                     num_workers=0, activation_checkpointing=False, eval_every=t.eval_every)
