"""BERT's SDPA self-attention (:mod:`fpm.models.bert_attention`) with fpm's CPU kernels: the
projection's backward from contiguous operands, q/k/v split without a stacking copy, and
attention as matmuls + fused softmax/dropout when gradients are needed (:mod:`fpm.cpu.kernels`).
Same parameters, same results up to float rounding; swapped in by :func:`fpm.cpu.speed.speed_up`."""

from __future__ import annotations

from torch import nn

from fpm.cpu import kernels
from fpm.models.bert_attention import SdpaSelfAttention


class CpuSelfAttention(SdpaSelfAttention):
    @staticmethod
    def project(x, w, bias, shape):
        return kernels.split_heads(kernels.linear(x, w, bias).view(shape))

    @staticmethod
    def attend(q, k, v, mask, dropout_p, scale):
        return kernels.attention(q, k, v, mask, dropout_p=dropout_p, scale=scale)


def use_cpu_attention(model: nn.Module) -> int:
    """Give every :class:`SdpaSelfAttention` of ``model`` the CPU kernels in place; returns how many."""
    return kernels.swap_class(model, SdpaSelfAttention, CpuSelfAttention)
