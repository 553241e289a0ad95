"""Model builders for the three families, configured by a recipe.

``build_model`` makes the ``transformers`` model and applies the paper's initialisation;
``count_params`` builds on the meta device, so a 10B model is counted without allocating it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fpm.config.schema import ModelCfg, Recipe
from fpm.models import bert, gpt, kernels, t5
from fpm.models.init import init_weights, scale_residual_projections

FAMILIES = {"bert": bert, "gpt": gpt, "t5": t5}


def residual_projections(model: nn.Module, cfg: ModelCfg) -> dict[int, list[nn.Module]]:
    if cfg.family == "t5":
        return t5.residual_projections(model, cfg.n_encoder_layers, cfg.n_decoder_layers)
    return FAMILIES[cfg.family].residual_projections(model, cfg.n_layers)


def build_model(cfg: ModelCfg, vocab_size: int, *, init: bool = True, pad_id: int = 0,
                eos_id: int | None = None) -> nn.Module:
    """The family's pretraining model, initialised as in §4.1 unless ``init=False``; its dropout
    layers draw their masks with :func:`fpm.models.kernels.dropout` and its linear layers (and GPT-2's
    ``Conv1D``) compute weight gradients as :class:`fpm.models.kernels.Linear` does (both fast on
    CPU, stock on GPU)."""
    model = FAMILIES[cfg.family].build(cfg, vocab_size, pad_id, eos_id)
    kernels.use_fast_dropout(model)
    kernels.use_fast_linear(model)
    kernels.use_fast_conv1d(model)  # GPT-2's projections
    if init and next(model.parameters()).device.type != "meta":
        init_weights(model, cfg.init_std)
        if cfg.scale_residual_init:
            scale_residual_projections(residual_projections(model, cfg), cfg.init_std)
    return model


def loss_fn(family: str) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    return FAMILIES[family].pretraining_loss


def count_params(recipe: Recipe) -> int:
    """Parameters of the recipe's pretraining model (shared/tied tensors counted once), on meta."""
    with torch.device("meta"):
        model = build_model(recipe.model, recipe.tokenizer.vocab_size, init=False)
    return sum(p.numel() for p in model.parameters())
