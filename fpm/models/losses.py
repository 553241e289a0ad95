"""A fused, chunked "linear + cross-entropy" for large vocabularies.

Scoring every position of a GPT batch against 50k vocabulary entries materialises a logits tensor
of batch × sequence × vocabulary (823 MB in fp32 for 32 × 128 × 50,257), then a softmax of the same
size, then their gradients — memory traffic that costs more than the matrix multiply itself on a
CPU and a large share of the activation memory on a GPU. This computes the loss a chunk of rows at
a time and, since the gradient of cross-entropy is known in closed form (softmax − one-hot), the
gradients with respect to the hidden states and the output matrix in the same pass; only those are
kept for backward. The element-wise part of a chunk (softmax, loss, gradient, cast) is one
``torch.compile``d function — a single fused pass instead of about nine — with an eager fallback
where no compiler is available. The result is the mean cross-entropy over positions whose label
is not -100, equal to ``F.cross_entropy(linear(hidden), labels)`` up to float rounding.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 2048


def _chunk_grad(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """(summed loss over rows with scale > 0, d loss / d logits × scale in the logits' dtype);
    ``bias`` is added to the logits first (in fp32, fused with the rest)."""
    x = logits.float() if bias is None else logits.float() + bias.float()
    top = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - top)
    norm = e.sum(dim=-1, keepdim=True)
    lse = (top + norm.log()).squeeze(1)
    picked = x.gather(1, target[:, None]).squeeze(1)
    loss = ((lse - picked) * (scale > 0)).sum()
    onehot = torch.zeros_like(x).scatter_(1, target[:, None], 1.0)
    return loss, ((e / norm - onehot) * scale[:, None]).to(logits.dtype)


_COMPILED = None


def _chunk_fn():
    """The compiled chunk function, or the eager one when compiling is off or fails."""
    global _COMPILED
    if _COMPILED is None:
        if os.environ.get("FPM_NO_COMPILE") == "1":
            _COMPILED = _chunk_grad
        else:
            try:
                compiled = torch.compile(_chunk_grad, dynamic=None)
                probe = torch.zeros(2, 3)
                compiled(probe, torch.zeros(2, dtype=torch.long), torch.ones(2))
                _COMPILED = compiled
            except Exception:  # no C++ compiler / triton here: the eager path is exact, only slower
                _COMPILED = _chunk_grad
    return _COMPILED


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk: int):
        n = hidden.shape[0]
        ok_all = labels != -100
        inv_valid = 1.0 / ok_all.sum().clamp(min=1).float()
        grad_h = torch.empty_like(hidden)
        # one chunk (BERT's masked rows, small batches): the weight gradient comes straight out of
        # one matmul; several chunks accumulate in fp32
        grad_w = None
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        fn = _chunk_fn()
        for s in range(0, n, chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            ok = ok_all[s:s + chunk]
            logits = h @ weight.t()
            loss, g = fn(logits, y.clamp(min=0), ok.float() * inv_valid, bias)
            del logits
            total += loss
            torch.mm(g, weight, out=grad_h[s:s + chunk])
            if n <= chunk:
                grad_w = g.t() @ h
            elif grad_w is None:
                grad_w = (g.t() @ h).float()
            else:
                grad_w.add_(g.t() @ h)
            if grad_b is not None:
                grad_b.add_(g.sum(0, dtype=torch.float32))
        if grad_w is None:  # no rows at all
            grad_w = torch.zeros_like(weight)
        ctx.has_bias = bias is not None
        saved = [grad_h, grad_w.to(weight.dtype)] + ([grad_b.to(bias.dtype)] if bias is not None else [])
        ctx.save_for_backward(*saved)
        return total * inv_valid

    @staticmethod
    def backward(ctx, grad_out):
        # the saved gradients are used once: scale them in place instead of allocating copies
        grad_h, grad_w, *grad_b = ctx.saved_tensors
        grad_bias = grad_b[0].mul_(grad_out) if ctx.has_bias else None
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), grad_bias, None, None


def linear_cross_entropy(hidden: torch.Tensor, linear: nn.Linear, labels: torch.Tensor,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Mean cross-entropy of ``linear(hidden)`` against ``labels`` (-100 ignored), fused and chunked.

    Calls the module itself when its weight is a ZeRO-3 partition (DeepSpeed gathers it only inside
    the module's forward) or when no gradient is needed.
    """
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or linear.weight.requires_grad)
    if hasattr(linear.weight, "ds_id") or not needs_grad:
        return F.cross_entropy(linear(hidden).float(), labels, ignore_index=-100)
    return _LinearCrossEntropy.apply(hidden, linear.weight, linear.bias, labels, chunk)
