"""Dropout and attention that are fast on CPU; on a GPU the stock PyTorch kernels are used.

Measured here (2 cores, bf16, the BERT shape of ``bench/train_throughput.py``):

* ``F.dropout`` draws its mask with a Bernoulli sampler at ~160M values/s, which made dropout a
  fifth of a training step. :func:`dropout` draws 64-bit words with ``random_`` (~1G 16-bit values/s)
  and keeps an element when its 16 bits clear a threshold, so the drop probability is ``p`` rounded
  to a multiple of 1/65536 (flash-attention rounds it to 1/256). The mask comes from the default
  torch generator, so checkpointed RNG state still makes a resumed run exact.
* With dropout on, ``scaled_dot_product_attention`` on CPU falls back to its math path, and without
  dropout its flash kernel's bf16 backward pass is ~6x slower than batched matmuls.
  :func:`attention` computes softmax(QK^T/sqrt(d) + mask) V with matmuls and :func:`dropout` on the
  probabilities: 24 ms instead of 68 ms forward+backward per layer of that shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_HALF = 1 << 15


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` holding 1/(1-p) where an element is kept and 0 where it is dropped."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    mask = torch.empty(shape, dtype=dtype)
    torch.ge(bits, round(p * 2 * _HALF) - _HALF, out=mask)
    return mask.mul_(1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return x * keep_mask(x.shape, p, x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with :func:`dropout`'s CPU mask; no parameters, so state dicts are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` for (batch, heads, seq, d_head) inputs; ``mask`` is additive.

    On CPU when gradients are needed: matmuls, softmax and :func:`dropout`; otherwise SDPA itself
    (inference, and every GPU)."""
    if q.device.type != "cpu" or not torch.is_grad_enabled() or not q.requires_grad:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        t, s = scores.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).triu_(s - t + 1)
        scores = scores.masked_fill(causal, float("-inf"))
    if mask is not None:
        scores = scores.add_(mask)  # in place: neither matmul nor masked_fill saves its output
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(dropout(probs, dropout_p), v)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` of ``model`` for :class:`Dropout` in place; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = Dropout
            n += 1
    return n
