"""GPT family: GPT-2 decoder (transformers' GPT2LMHeadModel), next-token loss on packed windows."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2 import modeling_gpt2 as hf

from fpm.config.schema import ModelCfg
from fpm.models.losses import linear_cross_entropy, token_losses


def hf_config(cfg: ModelCfg, vocab_size: int, pad_id: int = 0, eos_id: int | None = None) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.max_positions,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        activation_function=cfg.activation,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=vocab_size - 1 if eos_id is None else eos_id,
        eos_token_id=vocab_size - 1 if eos_id is None else eos_id,
        pad_token_id=pad_id,
        use_cache=False,
        attn_implementation=cfg.attention,
    )


def residual_projections(model: nn.Module, n_layers: int) -> dict[int, list[nn.Module]]:
    mods = []
    for module in model.modules():
        if isinstance(module, hf.GPT2Attention):
            mods.append(module.c_proj)
        elif isinstance(module, hf.GPT2MLP):
            mods.append(module.c_proj)
    return {n_layers: mods}


def build(cfg: ModelCfg, vocab_size: int, pad_id: int = 0, eos_id: int | None = None) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(hf_config(cfg, vocab_size, pad_id, eos_id))


def pretraining_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy; ``input_ids`` and ``labels`` are already shifted.

    The LM head and the loss are fused and chunked (:mod:`fpm.models.losses`): the full
    batch × sequence × vocabulary logits are never materialised.
    """
    hidden = model.transformer(input_ids=batch["input_ids"], return_dict=False)[0]
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head, batch["labels"].reshape(-1))


def validation_sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per sample: the summed next-token cross-entropy and the number of scored tokens."""
    hidden = model.transformer(input_ids=batch["input_ids"], return_dict=False)[0]
    labels = batch["labels"]
    loss, _ = token_losses(hidden.reshape(-1, hidden.shape[-1]), model.lm_head, labels.reshape(-1))
    return {"lm_loss_sum": loss.view(labels.shape).sum(1), "lm_tokens": (labels != -100).sum(1)}
