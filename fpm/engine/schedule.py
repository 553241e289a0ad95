"""Optimizer parameter groups and the learning-rate schedule of §4.1."""

from __future__ import annotations

import math

from torch import nn


def lr_factor(step: int, *, lr: float, min_lr: float, warmup: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR after ``step`` optimizer steps: linear warm-up, then cosine to
    ``min_lr`` (GPT: "a single-loop cosine decay ... to the minimum learning rate") or linear decay
    (BERT: "decay linearly in remaining iterations"), or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or max_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = min_lr / lr
    if schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and normalisation weights (a ZeRO-3
    partition is a flat slice: its full shape is ``ds_shape``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if len(getattr(p, "ds_shape", p.shape)) < 2 or name.endswith(".bias") or "norm" in name.lower() or ".ln" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
