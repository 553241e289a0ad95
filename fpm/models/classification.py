"""Sequence classification's forward and loss for any `transformers` ...ForSequenceClassification
model (fpm's MegatronBert classifiers and Hugging Face encoders such as BERT)."""

from __future__ import annotations

import torch


def classification_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                 attention_mask=batch["attention_mask"]).logits


def classification_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(classification_logits(model, batch).float(), batch["labels"])
