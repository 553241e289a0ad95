"""Model builders for the three families, configured by a recipe.

``build_model`` makes the ``transformers`` model and applies the paper's initialisation;
``objective`` pairs it with its family's pretraining loss as one module (the training loop calls
it through the DeepSpeed engine); ``count_params`` builds on the meta device, so a 10B model is
counted without allocating it.
"""

from __future__ import annotations

import torch
from torch import nn

from fpm.config.schema import ModelCfg, Recipe
from fpm.models import bert, gpt, t5
from fpm.models.init import init_weights, scale_residual_projections
from fpm.models.objective import Objective

FAMILIES = {"bert": bert, "gpt": gpt, "t5": t5}


def residual_projections(model: nn.Module, cfg: ModelCfg) -> dict[int, list[nn.Module]]:
    if cfg.family == "t5":
        return t5.residual_projections(model, cfg.n_encoder_layers, cfg.n_decoder_layers)
    return FAMILIES[cfg.family].residual_projections(model, cfg.n_layers)


def build_model(cfg: ModelCfg, vocab_size: int, *, init: bool = True, pad_id: int = 0,
                eos_id: int | None = None, seed: int | None = None) -> nn.Module:
    """The family's pretraining model, initialised as in §4.1 unless ``init=False``. A workflow
    that trains it applies :func:`fpm.cpu.speed.speed_up` after.

    The modules are constructed without ``transformers``' (and torch's) own initialisation: fpm's
    covers every parameter, and under ``deepspeed.zero.Init`` (ZeRO-3) transformers' would index
    tensors that are already partitioned. With ``seed``, the initial weights depend on the seed
    alone, whatever else drew from the generator before.
    """
    with _no_init_weights():
        model = FAMILIES[cfg.family].build(cfg, vocab_size, pad_id, eos_id)
    model.tie_weights()  # skipped with the initialisation
    if init and next(model.parameters()).device.type != "meta":
        if seed is not None:
            torch.manual_seed(seed)
        init_weights(model, cfg.init_std)
        if cfg.scale_residual_init:
            scale_residual_projections(residual_projections(model, cfg), cfg.init_std)
    return model


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def objective(cfg: ModelCfg, model: nn.Module) -> Objective:
    """``model`` with its family's pretraining loss: ``objective(batch)`` is the loss."""
    family = FAMILIES[cfg.family]
    return Objective(model, family.pretraining_loss, family.validation_sums)


def pretraining_objective(recipe: Recipe, specials) -> Objective:
    """The recipe's pretraining model, initialised from ``train.seed``, with its family's loss
    (``specials``: the tokenizer's special ids)."""
    model = build_model(recipe.model, recipe.tokenizer.vocab_size, pad_id=specials.pad,
                        eos_id=specials.eos or specials.eod, seed=recipe.train.seed)
    return objective(recipe.model, model)


def count_params(recipe: Recipe) -> int:
    """Parameters of the recipe's pretraining model (shared/tied tensors counted once), on meta."""
    with torch.device("meta"):
        model = build_model(recipe.model, recipe.tokenizer.vocab_size, init=False)
    return sum(p.numel() for p in model.parameters())
