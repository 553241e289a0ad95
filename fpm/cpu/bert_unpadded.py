"""A padding-free forward pass for transformers' BERT encoders: MegatronBert (fpm's BERT family,
pre-LN) and Bert (post-LN, e.g. the Hugging Face checkpoints fine-tuning starts from).

BERT batches are padded to the sequence length: on the bench's data 8.9% of positions are padding,
and the Hugging Face encoder runs every projection, LayerNorm, GELU and dropout on them. This runs
the same modules, with the same parameters, on the positions that matter only — the real tokens,
any position that carries an MLM label, and each row's first position (the pooler's [CLS]) — as one
[tokens, hidden] matrix, as NVIDIA's MLPerf BERT does ("unpadding"). Only attention needs the
padded layout: queries, keys and values are scattered into per-sequence blocks, the softmax masks
padded keys as the stock model does, and the context is gathered back. The result at every kept
position equals the stock encoder's (``tests/test_bert_unpadded.py``).

Each residual branch ends in dropout, the residual add and the next sub-layer's LayerNorm
(pre-LN: ``x = x + dropout(f(LN(x)))``); :func:`fpm.cpu.kernels.dropout_add_layer_norm` does the
three in one pass forward and one backward on CPU.

Post-LN (Bert) layers are ``x = LN(x + dropout(f(x)))``: the same fused step, keeping its
normalised output only.

:func:`pretraining_loss` is BERT's pretraining loss on this forward where it applies
(:func:`applies`), else the stock one; :func:`classification_loss` the same for sequence
classification (fine-tuning, whose batches are padded to their longest row only: the rest of the
padding goes here). :func:`fpm.cpu.speed.speed_up` installs them (on any device: fewer positions are
fewer FLOPs on a GPU too, where the kernels below fall back to PyTorch's).
"""

from __future__ import annotations

import torch
from torch import nn

from fpm.cpu import kernels
from fpm.models import bert
from fpm.models.bert_attention import SdpaSelfAttention
from fpm.models.classification import classification_loss as stock_classification_loss


def _post_ln(encoder: nn.Module) -> bool:
    """transformers' Bert (LayerNorm after each residual add) rather than MegatronBert (before)."""
    from transformers.models.bert.modeling_bert import BertModel

    return isinstance(encoder, BertModel)


def applies(bert: nn.Module) -> bool:
    """True for an encoder whose modules this forward can run: fpm's SDPA attention (MegatronBert)
    or transformers' Bert self-attention with absolute positions, parameters not partitioned by
    ZeRO-3, layers not compiled."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    layers = bert.encoder.layer
    if _post_ln(bert):
        config = bert.config
        attention_ok = (type(layers[0].attention.self) is BertSelfAttention and not config.is_decoder
                        and getattr(config, "position_embedding_type", "absolute") == "absolute")
    else:
        attention_ok = all(isinstance(layer.attention.self, SdpaSelfAttention) for layer in layers)
    return (attention_ok
            and not any(hasattr(p, "ds_id") for p in bert.parameters())
            and not any(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers))


# Token counts are rounded up to a multiple of this with padding positions (computed as the stock model
# computes them): a weight gradient's transposed operand has the token count as its row length, and
# oneDNN's bf16 matmul runs at about a third of its speed on rows that are not 64-byte aligned
# (measured: 11.5 ms for a 513 x 3845 by 3845 x 2048 product, 4 ms at 3840).
ROW_MULTIPLE = 64


class Unpadded:
    """The kept positions of a padded [batch, seq] batch: ``index`` (flat positions, ascending) and
    ``row_of`` (flat position -> row of the unpadded matrix, -1 where not kept)."""

    def __init__(self, keep: torch.Tensor, multiple: int | None = None):
        self.batch, self.seq = keep.shape
        flat = keep.reshape(-1)
        extra = -int(flat.sum()) % (multiple or ROW_MULTIPLE)
        if extra:  # a few padding positions more, so that the token count is a multiple of `multiple`
            flat = flat.clone()
            flat[(~flat).nonzero().squeeze(1)[:extra]] = True
        self.index = flat.nonzero().squeeze(1)
        self.row_of = torch.where(flat, flat.long().cumsum(0) - 1, -1)
        self.tokens = self.index.numel()

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        return self.row_of[positions]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> [batch * seq, ...] with zeros at the positions not kept."""
        return x.new_zeros((self.batch * self.seq, *x.shape[1:])).index_copy(0, self.index, x)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[batch * seq, ...] -> [tokens, ...]."""
        return x.index_select(0, self.index)


class _ToHeads(torch.autograd.Function):
    """[tokens, groups * heads * d] rows -> ``groups`` zero-padded (batch, heads, seq, d) tensors,
    contiguous (C++: one pass, no zero-filled intermediate); backward gathers the rows back."""

    @staticmethod
    def forward(ctx, rows, u: Unpadded, groups: int, heads: int, bias):
        ctx.u = u
        return tuple(kernels.extension().to_heads(rows, u.row_of, u.batch, u.seq, groups, heads, bias))

    @staticmethod
    def backward(ctx, *grads):
        like = next(g for g in grads if g is not None)
        full = [torch.zeros_like(like) if g is None else g for g in grads]
        return kernels.extension().to_rows(full, ctx.u.index), None, None, None, None


class _ToRows(torch.autograd.Function):
    """(batch, heads, seq, d) -> [tokens, heads * d] rows of the kept positions; backward scatters."""

    @staticmethod
    def forward(ctx, x, u: Unpadded):
        ctx.u, ctx.heads = u, x.shape[1]
        return kernels.extension().to_rows([x], u.index)

    @staticmethod
    def backward(ctx, grad):
        u = ctx.u
        return kernels.extension().to_heads(grad.contiguous(), u.row_of, u.batch, u.seq, 1, ctx.heads)[0], None


def _fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and kernels.extension() is not None


def _fused(x: torch.Tensor) -> bool:
    """bf16 on CPU with fpm's kernels: biases are added by the fused kernels after the matmuls."""
    return x.dtype == torch.bfloat16 and _fast(x)


def _dense_then_residual(dense: nn.Linear, a: torch.Tensor, x: torch.Tensor, ln: nn.LayerNorm, p: float,
                         training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``dropout_add_layer_norm(dense(a), x, ln)``, the bias added inside the fused kernel where it runs."""
    if dense.bias is not None and kernels.fused_residual(a, x, ln) and not hasattr(dense.weight, "ds_id"):
        return kernels.dropout_add_layer_norm(kernels.linear_bias_later(a, dense.weight, dense.bias), x, ln, p,
                                              training, h_bias=dense.bias)
    return kernels.dropout_add_layer_norm(dense(a), x, ln, p, training)


def to_heads(rows: torch.Tensor, u: Unpadded, groups: int, heads: int,
             bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``groups`` zero-padded (batch, heads, seq, d) tensors from [tokens, groups * heads * d] rows;
    ``bias`` (optional) is added to every row without a gradient (see kernels.linear_bias_later)."""
    bias = None if bias is None else bias.detach()
    if _fast(rows) and (bias is None or rows.dtype == bias.dtype == torch.bfloat16):
        return _ToHeads.apply(rows, u, groups, heads, bias)
    if bias is not None:
        rows = rows + bias
    d = rows.shape[1] // (groups * heads)
    padded = u.pad(rows).view(u.batch, u.seq, groups, heads, d)
    return tuple(padded.permute(2, 0, 3, 1, 4).unbind(0))


def to_rows(x: torch.Tensor, u: Unpadded) -> torch.Tensor:
    if _fast(x):
        return _ToRows.apply(x, u)
    return u.unpad(x.transpose(1, 2).reshape(u.batch * u.seq, -1))


def _attention(module: nn.Module, y: torch.Tensor, u: Unpadded, key_mask: torch.Tensor) -> torch.Tensor:
    """The self-attention sub-layer's core (projection, attention, heads merged) on unpadded rows."""
    heads, d = module.num_attention_heads, module.attention_head_size
    s = d ** -0.5  # the softmax scale folded into the query projection, as SdpaSelfAttention does
    w = torch.cat([module.query.weight * s, module.key.weight, module.value.weight])
    b = torch.cat([module.query.bias * s, module.key.bias, module.value.bias])
    if _fused(y):  # the bias is added while the rows are copied into the heads layout
        q, k, v = to_heads(kernels.linear_bias_later(y, w, b), u, 3, heads, bias=b)
    else:
        q, k, v = to_heads(kernels.linear(y, w, b), u, 3, heads)
    p = module.dropout.p if module.training else 0.0
    return to_rows(kernels.attention(q, k, v, key_mask, dropout_p=p, scale=1.0), u)


def _layer(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, next_ln: nn.LayerNorm, u: Unpadded,
           key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-LN layer: (residual stream x, LN(x)) -> the same after the layer, where the second
    output is already normalised by ``next_ln`` (the next layer's attention LayerNorm, or the
    encoder's final one)."""
    att = layer.attention
    x, y = _dense_then_residual(att.output.dense, _attention(att.self, y, u, key_mask), x, layer.ln,
                                att.output.dropout.p, layer.training)
    return _dense_then_residual(layer.output.dense, layer.intermediate(y), x, next_ln, layer.output.dropout.p,
                                layer.training)


def _post_ln_layer(layer: nn.Module, x: torch.Tensor, u: Unpadded, key_mask: torch.Tensor) -> torch.Tensor:
    """One post-LN (Bert) layer on the unpadded residual stream."""
    att = layer.attention
    _, x = _dense_then_residual(att.output.dense, _attention(att.self, x, u, key_mask), x, att.output.LayerNorm,
                                att.output.dropout.p, layer.training)
    _, x = _dense_then_residual(layer.output.dense, layer.intermediate(x), x, layer.output.LayerNorm,
                                layer.output.dropout.p, layer.training)
    return x


def encode(bert: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
           keep: torch.Tensor) -> tuple[torch.Tensor, Unpadded]:
    """The encoder's final hidden states (after its last LayerNorm) at the positions where ``keep``
    is true, as a [tokens, hidden] matrix, and the :class:`Unpadded` map of those positions.
    ``keep`` must include every position that is attended to (``attention_mask``)."""
    u = Unpadded(keep)
    seq = input_ids.shape[1]
    emb = bert.embeddings
    positions = u.index % seq
    x = emb.word_embeddings(input_ids.reshape(-1)[u.index]) + emb.token_type_embeddings(
        token_type_ids.reshape(-1)[u.index])
    x = x + emb.position_embeddings(emb.position_ids[0, positions])
    layers = bert.encoder.layer
    dtype = x.dtype
    # additive key-padding mask, broadcast over heads and queries (the stock model's extended mask)
    key_mask = ((1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min)
    if _post_ln(bert):
        ln = emb.LayerNorm
        x = emb.dropout(nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps))
        for layer in layers:
            if getattr(layer, "gradient_checkpointing", False) and layer.training:
                x = layer._gradient_checkpointing_func(_post_ln_layer, layer, x, u, key_mask)
            else:
                x = _post_ln_layer(layer, x, u, key_mask)
        return x, u
    x = emb.dropout(x)
    first = layers[0].attention.ln
    y = nn.functional.layer_norm(x, first.normalized_shape, first.weight, first.bias, first.eps)
    for i, layer in enumerate(layers):
        next_ln = layers[i + 1].attention.ln if i + 1 < len(layers) else bert.encoder.ln
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            x, y = layer._gradient_checkpointing_func(_layer, layer, x, y, next_ln, u, key_mask)
        else:
            x, y = _layer(layer, x, y, next_ln, u, key_mask)
    return y, u


def _first_rows(hidden: torch.Tensor, u: Unpadded, keep: torch.Tensor) -> torch.Tensor:
    """Each row's first position ([CLS], which the pooler reads) from the unpadded hidden states."""
    return hidden[u.rows(torch.arange(keep.shape[0], device=keep.device) * keep.shape[1])]


def pretraining_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`fpm.models.bert.pretraining_loss` computed on the positions that matter only: the
    real tokens, the masked ones and each row's [CLS]; the stock loss where this does not apply."""
    if not applies(model.bert):
        return bert.pretraining_loss(model, batch)
    keep = batch["attention_mask"].bool() | (batch["labels"] != -100)
    keep[:, 0] = True  # the pooler's [CLS]
    hidden, u = encode(model.bert, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], keep)
    labels = batch["labels"].reshape(-1)
    picked = labels != -100
    masked = hidden[u.rows(picked.nonzero().squeeze(1))]
    pooled = model.bert.pooler.activation(model.bert.pooler.dense(_first_rows(hidden, u, keep)))
    return bert.heads_loss(model, masked, pooled, labels[picked], batch["sop_labels"])


def classification_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A ...ForSequenceClassification BERT's logits from its real tokens only (the caller checks
    :func:`applies` to ``model.bert``)."""
    keep = batch["attention_mask"] != 0  # a new tensor: the batch is not modified
    keep[:, 0] = True  # the pooler's [CLS]
    hidden, u = encode(model.bert, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], keep)
    pooler = model.bert.pooler
    pooled = pooler.activation(pooler.dense(_first_rows(hidden, u, keep)))
    return model.classifier(model.dropout(pooled))


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`fpm.models.classification.classification_loss` on the real tokens only; the stock
    loss for models this forward does not cover."""
    base = getattr(model, "bert", None)
    if base is None or getattr(base, "pooler", None) is None or not applies(base):
        return stock_classification_loss(model, batch)
    return nn.functional.cross_entropy(classification_logits(model, batch).float(), batch["labels"])
