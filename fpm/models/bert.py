"""BERT family: pre-LayerNorm encoder (transformers' MegatronBert) with MLM + sentence-order heads.

Megatron-BERT moves the LayerNorm in front of each sub-layer, which is what lets 50-90 layer BERTs
train; its 2-way ``seq_relationship`` head is used for sentence order prediction instead of NSP.
Attention is one fused q/k/v projection and PyTorch's SDPA (:mod:`fpm.models.bert_attention`); the
parameters are untouched, so saved weights load in plain ``transformers`` and give the same outputs.
The padding-free encoder and the CPU kernels are applied from outside (:func:`fpm.cpu.speed.speed_up`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MegatronBertConfig, MegatronBertForPreTraining
from transformers.models.megatron_bert import modeling_megatron_bert as hf

from fpm.config.schema import ModelCfg
from fpm.models.bert_attention import use_sdpa
from fpm.models.losses import linear_cross_entropy, token_losses


def hf_config(cfg: ModelCfg, vocab_size: int, pad_id: int = 0, eos_id: int | None = None) -> MegatronBertConfig:
    return MegatronBertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        hidden_act=cfg.activation,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_positions,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=pad_id,
    )


def residual_projections(model: nn.Module, n_layers: int) -> dict[int, list[nn.Module]]:
    mods = []
    for module in model.modules():
        if isinstance(module, hf.MegatronBertSelfOutput) or isinstance(module, hf.MegatronBertOutput):
            mods.append(module.dense)
    return {n_layers: mods}


def build(cfg: ModelCfg, vocab_size: int, pad_id: int = 0, eos_id: int | None = None) -> MegatronBertForPreTraining:
    model = MegatronBertForPreTraining(hf_config(cfg, vocab_size, pad_id, eos_id))
    if cfg.attention == "sdpa":
        use_sdpa(model)
    return model


def pretraining_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MLM cross-entropy over the masked positions + SOP cross-entropy."""
    hidden, pooled = model.bert(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                attention_mask=batch["attention_mask"], return_dict=False)[:2]
    labels = batch["labels"].reshape(-1)
    picked = labels != -100
    return heads_loss(model, hidden.reshape(-1, hidden.shape[-1])[picked], pooled, labels[picked],
                      batch["sop_labels"])


def heads_loss(model: nn.Module, masked: torch.Tensor, pooled: torch.Tensor, mlm_labels: torch.Tensor,
               sop_labels: torch.Tensor) -> torch.Tensor:
    """The two heads' losses from the encoder's hidden states at the masked positions and its pooled
    [CLS] output.

    The vocabulary projection runs only on the ~15% masked positions: the same loss as scoring
    every position and ignoring the rest (HF's MegatronBertForPreTraining), at a fraction of the
    cost of the largest matrix multiply and of the softmax over 30k entries.
    """
    head = model.cls.predictions
    mlm = linear_cross_entropy(head.transform(masked), head.decoder, mlm_labels)  # fused: no fp32 logits
    sop = F.cross_entropy(model.cls.seq_relationship(pooled).float(), sop_labels)
    return mlm + sop


@torch.no_grad()
def validation_sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per sample: MLM cross-entropy summed over the masked tokens, their number and how many are
    predicted right; SOP cross-entropy and whether it is right."""
    hidden, pooled = model.bert(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                                attention_mask=batch["attention_mask"], return_dict=False)[:2]
    labels = batch["labels"]
    head = model.cls.predictions
    loss, correct = token_losses(head.transform(hidden.reshape(-1, hidden.shape[-1])), head.decoder,
                                 labels.reshape(-1))
    sop_logits = model.cls.seq_relationship(pooled).float()
    return {"mlm_loss_sum": loss.view(labels.shape).sum(1), "mlm_tokens": (labels != -100).sum(1),
            "mlm_correct": correct.view(labels.shape).sum(1),
            "sop_loss": F.cross_entropy(sop_logits, batch["sop_labels"], reduction="none"),
            "sop_correct": (sop_logits.argmax(-1) == batch["sop_labels"]).long()}
