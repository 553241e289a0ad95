"""Encoder-decoder family: CPM-2-style T5 (transformers' T5ForConditionalGeneration), span corruption."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5 import modeling_t5 as hf

from fpm.config.schema import ModelCfg

def hf_config(cfg: ModelCfg, vocab_size: int, pad_id: int = 0, eos_id: int | None = None) -> T5Config:
    return T5Config(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_head,
        d_ff=cfg.d_ff,
        num_layers=cfg.n_encoder_layers,
        num_decoder_layers=cfg.n_decoder_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_factor=1.0,
        feed_forward_proj=cfg.activation,
        # transformers >= 5 always ties T5's LM head to the input embedding; with a tied head the
        # decoder output is scaled by d_model**-0.5 before the projection, as in the original T5.
        pad_token_id=pad_id,
        eos_token_id=1 if eos_id is None else eos_id,
        decoder_start_token_id=pad_id,
        use_cache=False,
        attn_implementation=cfg.attention,
    )


def residual_projections(model: nn.Module, n_encoder: int, n_decoder: int) -> dict[int, list[nn.Module]]:
    out: dict[int, list[nn.Module]] = {n_encoder: [], n_decoder: []} if n_encoder != n_decoder else {n_encoder: []}
    for stack, n in ((model.encoder, n_encoder), (model.decoder, n_decoder)):
        for module in stack.modules():
            if isinstance(module, hf.T5Attention):
                out[n].append(module.o)
            elif isinstance(module, (hf.T5DenseActDense, hf.T5DenseGatedActDense)):
                out[n].append(module.wo)
    return out


def build(cfg: ModelCfg, vocab_size: int, pad_id: int = 0, eos_id: int | None = None) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(hf_config(cfg, vocab_size, pad_id, eos_id))


def pretraining_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the decoder over the sentinel-delimited targets (padding is -100)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
    ).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def validation_sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per sample: the decoder's summed cross-entropy over its targets and their number."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"],
                   decoder_attention_mask=batch["decoder_attention_mask"]).logits
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return {"lm_loss_sum": loss.sum(1), "lm_tokens": (labels != -100).sum(1)}
