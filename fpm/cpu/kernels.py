"""Dropout, attention and linear layers that are fast on CPU; on a GPU the stock PyTorch kernels run.

Measured here (2 cores, bf16, the BERT shape of ``bench/train_throughput.py``); the C++ parts are
one small extension (``csrc/cpu_kernels.cpp``) JIT-built with OpenMP and checked against torch
references before use (``FPM_NO_CPP_KERNELS=1`` or no compiler: stock PyTorch):

* ``F.dropout`` draws its mask with a Bernoulli sampler at ~160M values/s, which made dropout a
  fifth of a training step. :func:`dropout` instead hashes a counter with a seed (SplitMix64's
  output function) and keeps element ``i`` when 16-bit field ``i % 4`` of the hash of counter
  ``i // 4`` clears a threshold — a counter-based generator giving four values per call, like
  Philox on GPUs. In bf16 the product x·mask is one
  pass and backward hashes the same seed again, so no mask is written or saved (1.35 ms forward
  per 4.2M-element attention-probability tensor, against 2.1 ms for mask then multiply); other
  dtypes multiply by the mask. The drop probability is ``p`` rounded to a multiple of 1/65536. The
  seed is drawn from the default torch generator, so checkpointed RNG state still makes a resumed
  run exact and activation recomputation sees the same mask. (``torch.compile`` of the same hash
  produced wrong masks for some shapes and corrupted the heap for others in this torch build.)
* With dropout on, ``scaled_dot_product_attention`` on CPU falls back to its math path, and without
  dropout its flash kernel's bf16 backward pass is ~6x slower than batched matmuls.
  :func:`attention` computes softmax(QK^T/sqrt(d) + mask) V with matmuls and :func:`dropout` on the
  probabilities: 24 ms instead of 68 ms forward+backward per layer of that shape.
* A weight gradient dW = gᵀx contracts over the tokens, the leading dimension of both operands, so
  one reaches oneDNN's bf16 matmul transposed and runs at about half speed. :class:`Linear` (and
  :class:`Conv1D` for GPT-2) transpose the smaller operand first with a 16-bit AVX2 transpose
  (2.5x ``x.t().contiguous()``): -19 ms a step on the BERT shape.
* On a CPU without bf16 instructions (AVX2: no AMX, no AVX-512 BF16) PyTorch's bf16 matmul runs at
  about 1 GFLOP/s: 14 ms against 1.2 ms for 1024x64 @ 64x256, 9.2 s against 50 ms for
  2048x512 @ 512x2048 (2-core AVX2 EPYC). There every matmul here (:func:`mm`, :func:`f_linear`)
  computes in fp32 from the bf16 operands and rounds the result once to bf16 — the arithmetic the
  bf16 matmul specifies (fp32 products and sums, one rounding), in another summation order.

Longer than 400 lines: the C++ kernels' loading, their self-check and the autograd functions
that call them are one unit (each kernel is a few lines of Python around one C++ entry point).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D as _HFConv1D

from fpm import splitmix
from fpm.cpu.features import native_bf16
from fpm.splitmix import signed64

_GAMMA, _MIX1, _MIX2 = (signed64(c) for c in (splitmix.GAMMA, splitmix.MIX1, splitmix.MIX2))  # torch: int64


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def keep_bits(seed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """16 random bits (0..65535) for each element of ``shape``: element ``i`` (row-major) takes the
    16-bit field ``i % 4`` (lowest first) of SplitMix64's output for ``seed + (i // 4) *
    0x9E3779B97F4A7C15`` — four elements per hash. Pure integer tensor operations."""
    i = torch.arange(math.prod(shape), dtype=torch.int64, device=seed.device)
    z = (i >> 2) * _GAMMA + seed
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return ((z >> (16 * (i & 3))) & 0xFFFF).view(shape)  # fields below bit 64 - 48: the sign does not reach them


def threshold(p: float) -> int:
    """Elements whose 16 hash bits are below this are dropped: ``p`` rounded to 1/65536."""
    return round(p * 65536)


def _mask(x: torch.Tensor, seed: torch.Tensor, thr: int, scale: float) -> torch.Tensor:
    """``scale`` where the element of ``x``'s shape is kept, 0 where dropped, in ``x``'s dtype."""
    return torch.where(keep_bits(seed, x.shape) >= thr, scale, 0.0).to(x.dtype)


_MODULE = None
_FALLBACK = "using PyTorch's dropout and linear backward and DeepSpeed's CPU Adam, which are slower on CPU"


def _probe(module) -> bool:
    """Every function of the extension against its torch reference, on small deterministic inputs
    that reach both the vector loops and their tails. No torch.randn here: drawing from the default
    generator would shift the random stream of whichever step first calls this, and break exact
    resumes."""
    seed = torch.tensor(1, dtype=torch.int64)
    probe = torch.ones(4, 5)
    ok = torch.equal(module.dropout_mask(probe, 1, 6554, 1.25), _mask(probe, seed, 6554, 1.25))
    x16 = ((torch.arange(37 * 5) % 251) - 125).view(37, 5).to(torch.bfloat16)  # exact in bf16
    ok = ok and torch.equal(module.dropout_apply(x16, 1, 6554, 1.25), x16 * _mask(x16, seed, 6554, 1.25))
    for shape in ((64, 48), (37, 45), (33, 16)):
        x = (torch.arange(shape[0] * shape[1]) % 251).view(shape).to(torch.bfloat16)
        ok = ok and torch.equal(module.transpose16(x), x.t().contiguous())
    g = x16.reshape(-1) / 64
    ok = ok and abs(module.sumsq16([g]) - float(g.float().square().sum())) < 1e-6 * float(g.float().square().sum())
    # one AdamW step (lr 0.1, betas 0.9/0.99, eps 1e-8, decay 0.01, step 1, gradients scaled by 0.5)
    w = torch.linspace(-1, 1, g.numel())
    m, v, p16 = torch.zeros_like(w), torch.zeros_like(w), torch.empty_like(g)
    module.adamw16(w, m, v, [g], [p16], 0.1, 0.9, 0.99, 1e-8, 0.01, 1, 0.5)
    g32 = g.float() * 0.5
    want = torch.linspace(-1, 1, g.numel()) * (1 - 0.1 * 0.01) - 0.1 * g32 / (g32.abs() + 1e-8)
    ok = (ok and torch.allclose(w, want, atol=1e-5) and torch.allclose(m, 0.1 * g32)
          and torch.allclose(v, 0.01 * g32 * g32) and torch.equal(p16, w.to(torch.bfloat16)))
    with torch.enable_grad():  # the references use autograd; the first call may come from a no-grad context
        return ok and _probe_unpadded(module) and _probe_softmax(module) and _probe_xent(module)


def _probe_unpadded(module) -> bool:
    """The padding-free BERT kernels against torch: rows <-> zero-padded heads (exact), and dropout +
    residual add + LayerNorm forward and backward (r exact, the rest to bf16 rounding)."""
    keep = torch.tensor([True, True, False, True, False, True])  # batch 2 x seq 3
    index = keep.nonzero().squeeze(1)
    row_of = torch.where(keep, keep.long().cumsum(0) - 1, -1)
    rows = (torch.arange(4 * 12) % 251).view(4, 12).to(torch.bfloat16)  # 2 groups x 2 heads x d 3
    want = rows.new_zeros(6, 12).index_copy(0, index, rows).view(2, 3, 2, 2, 3).permute(2, 0, 3, 1, 4)
    heads = module.to_heads(rows, row_of, 2, 3, 2, 2)
    ok = all(torch.equal(a, b) for a, b in zip(heads, want.unbind(0)))
    bias = (torch.arange(12) - 6).to(torch.bfloat16)  # small integers: the sums are exact in bf16
    want_b = rows.new_zeros(6, 12).index_copy(0, index, rows + bias).view(2, 3, 2, 2, 3).permute(2, 0, 3, 1, 4)
    ok = ok and all(torch.equal(a, b) for a, b in zip(module.to_heads(rows, row_of, 2, 3, 2, 2, bias), want_b.unbind(0)))
    ok = ok and torch.equal(module.to_rows(heads, index), rows)
    seed, n, c = torch.tensor(3, dtype=torch.int64), 5, 40  # 40: one 16-wide tail
    h = (((torch.arange(n * c) % 13) - 6) / 4).view(n, c).to(torch.bfloat16)
    x = (((torch.arange(n * c) % 7) - 3) / 2).view(n, c).to(torch.bfloat16)
    gamma, beta = torch.linspace(0.5, 1.5, c).to(torch.bfloat16), torch.linspace(-0.5, 0.5, c).to(torch.bfloat16)
    mask = _mask(h, seed, 6554, 1.25)
    r, y, mean, rstd = module.dropout_add_ln_forward(h, None, x, gamma, beta, 3, 6554, 1.25, 1e-5)
    hb = ((torch.arange(c) % 3) - 1).to(torch.bfloat16)  # h - hb + hb == h exactly in bf16 here
    ok = ok and torch.equal(module.dropout_add_ln_forward(h - hb, hb, x, gamma, beta, 3, 6554, 1.25, 1e-5)[1], y)
    rf = (x + h * mask).float().requires_grad_()
    yf = F.layer_norm(rf, (c,), gamma.float(), beta.float(), 1e-5)
    ok = ok and torch.equal(r, (x + h * mask)) and torch.allclose(y.float(), yf, atol=3e-2)
    dy = (((torch.arange(n * c) % 5) - 2) / 2).view(n, c).to(torch.bfloat16)
    dr = (((torch.arange(n * c) % 3) - 1) / 4).view(n, c).to(torch.bfloat16)
    (yf * dy.float()).sum().backward()
    dx_want = rf.grad + dr.float()
    dx, dh, dg, db = module.dropout_add_ln_backward(dy, dr, r, gamma, mean, rstd, 3, 6554, 1.25)
    xhat = (rf.detach() - mean[:, None]) * rstd[:, None]
    return (ok and torch.allclose(dx.float(), dx_want, atol=3e-2) and torch.allclose(dh.float(), dx_want * mask.float(), atol=5e-2)
            and torch.allclose(dg, (dy.float() * xhat).sum(0), atol=3e-2) and torch.allclose(db, dy.float().sum(0)))


def _probe_softmax(module) -> bool:
    """softmax_dropout_forward/backward against softmax, the dropout mask and autograd."""
    seed = torch.tensor(3, dtype=torch.int64)
    scores = (((torch.arange(2 * 3 * 20) % 11) - 5) / 2).view(2, 3, 20).to(torch.bfloat16)
    key_mask = torch.zeros(2, 20, dtype=torch.bfloat16)
    key_mask[1, 15:] = torch.finfo(torch.bfloat16).min
    probs, dropped = module.softmax_dropout_forward(scores, key_mask, 3, 6554, 1.25)
    sf = scores.float().requires_grad_()
    want = torch.softmax(sf + key_mask.float()[:, None, :], dim=-1)
    mask = _mask(probs, seed, 6554, 1.25)
    ok = (torch.allclose(probs.float(), want, atol=4e-3) and torch.equal(dropped, probs * mask)
          and bool((probs[1, :, 15:] == 0).all()))
    grad = (((torch.arange(2 * 3 * 20) % 7) - 3) / 2).view(2, 3, 20).to(torch.bfloat16)
    (want * (grad * mask).float()).sum().backward()
    got = module.softmax_dropout_backward(grad, probs, dropped, 1.25)
    return ok and torch.allclose(got.float(), sf.grad, atol=2e-2)


def _probe_xent(module) -> bool:
    """xent_grad16 against the cross-entropy gradient (softmax - onehot) and loss, with a bias."""
    logits = (((torch.arange(3 * 37) % 17) - 8) / 4).view(3, 37).to(torch.bfloat16)
    bias = torch.linspace(-1, 1, 37)
    target, scale = torch.tensor([0, 36, 5]), torch.tensor([0.5, 0.0, 0.25])
    x = logits.float() + bias
    want_loss = float(F.cross_entropy(x[[0, 2]], target[[0, 2]], reduction="sum"))
    want = (torch.softmax(x, -1) - F.one_hot(target, 37)) * scale[:, None]
    got = logits.clone()
    loss = module.xent_grad16(got, target, scale, bias)
    return abs(loss - want_loss) < 1e-4 * abs(want_loss) + 1e-5 and torch.allclose(got.float(), want, atol=4e-3)


def _probe_isolated(module) -> bool:
    """:func:`_probe` on a thread of its own. The first call to :func:`extension` may come from
    anywhere — inside an activation-checkpointed layer (whose saved-tensor hooks would record the
    probe's autograd tensors in the forward pass but not in the recomputation: "a different number
    of tensors was saved"), a no-grad or an autocast region. PyTorch keeps that state per thread,
    so a fresh thread sees none of it."""
    result: dict = {}

    def run():
        try:
            result["ok"] = _probe(module)
        except Exception as e:  # noqa: BLE001 - reported to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name="fpm-kernel-probe")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return bool(result["ok"])


def extension():
    """fpm's C++ kernels (``csrc/cpu_kernels.cpp``, JIT-built once into ``TORCH_EXTENSIONS_DIR`` like
    DeepSpeed's ops) with each function checked against its torch reference (:func:`_probe`), or
    ``None`` where they cannot be built (no C++ compiler) or ``FPM_NO_CPP_KERNELS=1``."""
    global _MODULE
    if _MODULE is None:
        _MODULE = False
        if os.environ.get("FPM_NO_CPP_KERNELS") != "1":
            try:
                from torch.utils.cpp_extension import load

                from fpm.cpu.build import guarded

                src = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
                # -fopenmp: without it at::parallel_for compiles to a serial loop (measured: the mask
                # kernel ran on one thread, 5.4 ms vs 2.7 ms per 8.4M elements)
                with guarded("fpm_cpu_kernels"):  # a lock left by a killed build is taken over
                    module = load("fpm_cpu_kernels", [str(src)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
                if _probe_isolated(module):
                    _MODULE = module
                else:
                    warnings.warn(f"fpm's C++ CPU kernels disagree with their torch references on this CPU; "
                                  f"{_FALLBACK}", stacklevel=2)
            except Exception as e:  # no compiler, no build: stock PyTorch kernels instead (slower on CPU)
                warnings.warn(f"fpm's C++ CPU kernels could not be built ({str(e).splitlines()[0][:160]}); "
                              f"{_FALLBACK}", stacklevel=2)
    return _MODULE or None


def _kernel():
    """The C++ dropout-mask kernel, or ``None``."""
    module = extension()
    return module.dropout_mask if module is not None else None


def transpose(x: torch.Tensor, ones_row: bool = False) -> torch.Tensor:
    """A contiguous copy of the transpose of 2-D ``x`` (the C++ kernel for 16-bit CPU tensors), with
    a row of ones appended below if ``ones_row``."""
    module = extension() if x.device.type == "cpu" and x.element_size() == 2 else None
    if module is not None:
        return module.transpose16(x, ones_row)
    xt = x.t()
    return torch.cat([xt, xt.new_ones(1, xt.shape[1])]) if ones_row else xt.contiguous()


def new_seed() -> torch.Tensor:
    """A fresh 63-bit seed from the default torch generator (so it is checkpointed with it)."""
    return torch.empty((), dtype=torch.int64).random_()


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype,
              seed: torch.Tensor | None = None) -> torch.Tensor:
    """The mask :func:`dropout` multiplies by for ``seed`` (a fresh one if omitted): 1/(1-p) where
    an element is kept, 0 where it is dropped."""
    seed = new_seed() if seed is None else seed
    like = torch.empty(shape, dtype=dtype)
    kernel = _kernel()
    if kernel is None:
        return _mask(like, seed, threshold(p), 1.0 / (1.0 - p))
    return kernel(like, int(seed), threshold(p), 1.0 / (1.0 - p))


class _Dropout16(torch.autograd.Function):
    """bf16 dropout that never writes its mask: forward multiplies by the hash mask in one pass, and
    backward hashes the same seed again (cheaper here than writing, saving and reading the mask)."""

    @staticmethod
    def forward(ctx, x, seed: int, thr: int, scale: float):
        ctx.args = (seed, thr, scale)
        return extension().dropout_apply(x, seed, thr, scale)

    @staticmethod
    def backward(ctx, grad):
        return extension().dropout_apply(grad, *ctx.args), None, None, None


def _hash_dropout_args(p: float, on: bool) -> tuple[int, int, float]:
    """(seed, threshold, scale) for the fused kernels' dropout: a fresh seed (the draw
    :func:`dropout` makes, so every path consumes the same random stream) when ``on``; otherwise
    no draw and a keep-everything mask."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not on or p == 0.0:
        return 0, 0, 1.0
    return int(new_seed()), threshold(p), 1.0 / (1.0 - p)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    kernel = _kernel() if x.device.type == "cpu" and p < 1.0 else None
    if kernel is None:
        return F.dropout(x, p, training)
    args = _hash_dropout_args(p, True)
    if x.dtype == torch.bfloat16:
        return _Dropout16.apply(x, *args)
    # x * mask: autograd keeps the mask for backward
    return x * kernel(x, *args)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with :func:`dropout`'s CPU mask; no parameters, so state dicts are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class _DropoutAddLayerNorm(torch.autograd.Function):
    """bf16 ``r = x + dropout(h)``, ``y = layer_norm(r)`` in one pass each way (C++): forward reads h
    and x once and writes r and y; backward reads dy, dr and r once and writes the gradients of x
    (dr + LayerNorm's backward) and h (the same times the dropout mask), instead of the five to six
    passes of dropout, add, LayerNorm, their backwards and the gradient sum."""

    @staticmethod
    def forward(ctx, h, x, weight, bias, seed: int, thr: int, scale: float, eps: float, h_bias=None):
        r, y, mean, rstd = extension().dropout_add_ln_forward(
            h.contiguous(), None if h_bias is None else h_bias.contiguous(), x.contiguous(), weight.contiguous(),
            bias.contiguous(), seed, thr, scale, eps)
        ctx.save_for_backward(r, weight, mean, rstd)
        ctx.args = (seed, thr, scale)
        return r, y

    @staticmethod
    def backward(ctx, dr, dy):
        r, weight, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dx, dh, dw, db = extension().dropout_add_ln_backward(dy, None if dr is None else dr.contiguous(), r,
                                                             weight.contiguous(), mean, rstd, *ctx.args)
        return dh, dx, dw.to(weight.dtype), db.to(weight.dtype), None, None, None, None, None


def dropout_add_layer_norm(h: torch.Tensor, x: torch.Tensor, ln: nn.LayerNorm, p: float,
                           training: bool = True, h_bias: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-LN residual step: ``r = x + dropout(h + h_bias)`` and ``layer_norm(r)`` with ``ln``'s
    parameters. ``h_bias`` (optional) is added without a gradient: for ``h`` from
    :func:`linear_bias_later`, which gives the bias its gradient. One fused C++ pass each way for
    bf16 on CPU (the dropout mask is :func:`dropout`'s for the same seed); stock operations elsewhere."""
    h_bias = None if h_bias is None else h_bias.detach()
    if not fused_residual(h, x, ln):
        r = x + dropout(h if h_bias is None else h + h_bias, p, training)
        return r, F.layer_norm(r, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    return _DropoutAddLayerNorm.apply(h, x, ln.weight, ln.bias, *_hash_dropout_args(p, training), ln.eps, h_bias)


def fused_residual(h: torch.Tensor, x: torch.Tensor, ln: nn.LayerNorm) -> bool:
    """Whether :func:`dropout_add_layer_norm` runs its C++ kernel for these inputs."""
    return (h.device.type == "cpu" and h.dtype == x.dtype == ln.weight.dtype == torch.bfloat16
            and ln.bias is not None and not hasattr(ln.weight, "ds_id") and extension() is not None)


class _SplitHeads(torch.autograd.Function):
    """(batch, seq, 3, heads, d) projections -> q, k, v as (batch, heads, seq, d) views; backward
    writes the three gradients straight into one buffer of the projection's layout (autograd's own
    unbind + permute backward stacks them, then copies the stack into that layout: one pass more)."""

    @staticmethod
    def forward(ctx, qkv):
        ctx.shape = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grad = dq.new_empty(ctx.shape) if dq is not None else (dk if dk is not None else dv).new_empty(ctx.shape)
        for part, g in zip(grad.permute(2, 0, 3, 1, 4).unbind(0), (dq, dk, dv)):
            if g is None:
                part.zero_()
            else:
                part.copy_(g)
        return grad


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (batch, heads, seq, d) from a (batch, seq, 3, heads, d) projection."""
    return _SplitHeads.apply(qkv)


class _SoftmaxDropout(torch.autograd.Function):
    """bf16 ``dropout(softmax(scores + key_mask))`` in one pass each way (C++): forward reads the
    scores once and writes the probabilities (kept for backward) and their dropped-out copy; backward
    reads the incoming gradient, the probabilities and the dropped-out copy (which marks the kept
    elements, so the seed is not hashed again). The mask is :func:`dropout`'s for the same seed; the
    key mask is additive, [batch, keys]."""

    @staticmethod
    def forward(ctx, scores, key_mask, seed: int, thr: int, scale: float):
        probs, dropped = extension().softmax_dropout_forward(scores.contiguous(), key_mask, seed, thr, scale)
        ctx.dropout = thr > 0
        ctx.save_for_backward(probs, dropped)  # dropped: also saved by the product with v that follows
        ctx.scale = scale
        return dropped

    @staticmethod
    def backward(ctx, grad):
        probs, dropped = ctx.saved_tensors
        return (extension().softmax_dropout_backward(grad.contiguous(), probs, dropped if ctx.dropout else None,
                                                     ctx.scale), None, None, None, None)


def _key_mask(mask: torch.Tensor | None, scores: torch.Tensor):
    """An additive mask that only depends on (batch, key) as a contiguous [batch, keys] bf16 tensor,
    ``None`` for no mask, ``False`` for any other mask (the fused softmax does not take it)."""
    if mask is None:
        return None
    b, t = scores.shape[0], scores.shape[-1]
    if mask.dim() == scores.dim() and mask.shape[0] == b and mask.shape[-1] == t and all(n == 1 for n in mask.shape[1:-1]):
        return mask.reshape(b, t).to(torch.bfloat16).contiguous()
    return False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` for (batch, heads, seq, d_head) inputs; ``mask`` is additive.

    On CPU when gradients are needed: matmuls, softmax and :func:`dropout`; otherwise SDPA itself
    (inference, and every GPU)."""
    if q.device.type != "cpu" or not torch.is_grad_enabled() or not q.requires_grad:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)
    scores = mm(q, k.transpose(-1, -2))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if scale != 1.0:  # callers may fold the scale into q's projection
        scores = scores.mul_(scale)
    key_mask = _key_mask(mask, scores) if scores.dtype == torch.bfloat16 and not is_causal else False
    if key_mask is not False and extension() is not None:
        probs = _SoftmaxDropout.apply(scores, key_mask, *_hash_dropout_args(dropout_p, True))
        return mm(probs, v)
    if is_causal:
        t, s = scores.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).triu_(s - t + 1)
        scores = scores.masked_fill(causal, float("-inf"))
    if mask is not None:
        scores = scores.add_(mask)  # in place: neither matmul nor masked_fill saves its output
    probs = torch.softmax(scores, dim=-1)
    return mm(dropout(probs, dropout_p), v)


def emulated_bf16(t: torch.Tensor) -> bool:
    """``t`` is bf16 on a CPU that emulates bf16 arithmetic (see the module's notes)."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not native_bf16()


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.matmul(a, b)`` (into ``out``); in fp32, rounded once, where bf16 is emulated."""
    if emulated_bf16(a):
        r = torch.matmul(a.float(), b.float())
        return r.to(a.dtype) if out is None else out.copy_(r)
    return torch.matmul(a, b) if out is None else torch.matmul(a, b, out=out)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc.addmm_(a, b)``: one rounding of acc + a·b; in fp32 where bf16 is emulated."""
    if emulated_bf16(a):
        return acc.copy_(torch.addmm(acc.float(), a.float(), b.float()))
    return acc.addmm_(a, b)


def f_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; in fp32, rounded once, where bf16 is emulated (differentiable either way)."""
    if emulated_bf16(x):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


class _LinearTransposedGrad(torch.autograd.Function):
    """``F.linear`` whose backward pass computes the weight gradient from a contiguous transpose.

    dW = gᵀx contracts over the tokens, the leading dimension of both operands, so one of them
    reaches the matmul transposed: oneDNN's bf16 matmul then runs at about half its rate here
    (7.3 ms vs 4.3 ms for the 2048 x 4096 x 512 FFN shapes). Transposing the smaller side with
    :func:`transpose` first (0.7 ms for 4096 x 512) wins for rectangular layers; for square ones
    (512 x 512) it does not, so :class:`Linear` uses this only when one side is at least twice
    the other.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return f_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return _linear_grads(x, weight, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                             ctx.has_bias and ctx.needs_input_grad[2])


def _rectangular(weight: torch.Tensor) -> bool:
    return max(weight.shape) >= 2 * min(weight.shape)


def _linear_grads(x, weight, grad, want_dx: bool, want_dw: bool, want_db: bool):
    """(dx, dW, db) of ``F.linear(x, weight, bias)`` for the output gradient ``grad``; for a
    rectangular weight, dW from a contiguous transposed operand (see :class:`_LinearTransposedGrad`)."""
    out_f, in_f = weight.shape
    g = grad.reshape(-1, out_f)
    dx = dw = db = None
    if want_dx:
        dx = mm(g, weight).view(x.shape)
    if want_dw:
        x2 = x.reshape(-1, in_f)
        if not _rectangular(weight):
            dw = mm(g.t(), x2)
        elif out_f <= in_f:
            dw = mm(transpose(g), x2)
        else:  # dWᵀ = xᵀg; a row of ones under xᵀ gives the bias gradient (g's column sums) as well
            dwt = mm(transpose(x2, ones_row=want_db), g)
            dw = transpose(dwt[:in_f])
            if want_db:
                db = dwt[in_f].clone()
    if want_db and db is None:
        db = g.sum(0)  # bf16 sum, fp32 accumulation inside (as autograd's own addmm backward)
    return dx, dw, db


class _LinearBiasLater(torch.autograd.Function):
    """``x Wᵀ`` without the bias, for a caller that adds the bias itself in a fused kernel, outside
    autograd (:func:`dropout_add_layer_norm`'s ``h_bias``, the padding-free BERT's q/k/v layout
    change): a bias in the matmul is first copied into its whole output. The bias still gets its
    gradient here — the column sums of the output gradient, as for ``F.linear``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return f_linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return _linear_grads(x, weight, grad, *ctx.needs_input_grad)


def linear_bias_later(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias) - bias``, with ``bias``'s gradient: see :class:`_LinearBiasLater`.
    The caller must add ``bias.detach()`` to the result."""
    return _LinearBiasLater.apply(x, weight, bias)


def _fast_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.requires_grad and torch.is_grad_enabled()
            and x.dtype == weight.dtype and weight.element_size() == 2
            and _rectangular(weight)
            and not hasattr(weight, "ds_id")  # a ZeRO-3 partition is gathered only inside F.linear
            and not torch.compiler.is_compiling() and extension() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with :class:`Linear`'s backward pass where it applies."""
    if _fast_linear(x, weight):
        return _LinearTransposedGrad.apply(x, weight, bias)
    return f_linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU backward pass uses :class:`_LinearTransposedGrad` (bf16/fp16 training
    of rectangular layers); same parameters, same results up to float rounding; stock elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_linear(x, self.weight):
            return _LinearTransposedGrad.apply(x, self.weight, self.bias)
        return f_linear(x, self.weight, self.bias)


class _Conv1DTransposedGrad(torch.autograd.Function):
    """``x @ W + b`` with ``W`` stored (in, out), as transformers' GPT-2 ``Conv1D``; the backward
    pass as :class:`_LinearTransposedGrad`'s. Here dW = xᵀg already has the weight's layout when
    x is the transposed side, and the row of ones gives the bias gradient with it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _conv1d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        in_f, out_f = weight.shape
        g = grad.reshape(-1, out_f)
        dx = mm(g, weight.t()).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = db = None
        want_db = ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, in_f)
            if in_f <= out_f:  # dW = (xᵀ; 1) g: the weight gradient and, in its last row, the bias gradient
                r = mm(transpose(x2, ones_row=want_db), g)
                dw = r[:in_f]  # contiguous rows of r
                db = r[in_f].clone() if want_db else None
            else:
                dw = transpose(mm(transpose(g), x2))
        if want_db and db is None:
            db = g.sum(0)
        return dx, dw, db


class Conv1D(_HFConv1D):
    """transformers' GPT-2 ``Conv1D`` with :class:`_Conv1DTransposedGrad`'s backward pass on CPU in
    bf16/fp16 for rectangular layers; same parameters; stock elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_linear(x, self.weight):
            return _Conv1DTransposedGrad.apply(x, self.weight, self.bias)
        return _conv1d(x, self.weight, self.bias)


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ W + b`` as transformers' ``Conv1D.forward`` computes it (one addmm); in fp32, rounded once,
    where bf16 is emulated."""
    x2 = x.reshape(-1, x.shape[-1])
    if emulated_bf16(x):
        out = torch.addmm(bias.float(), x2.float(), weight.float()).to(x.dtype)
    else:
        out = torch.addmm(bias, x2, weight)
    return out.view(*x.shape[:-1], weight.shape[1])


def use_fast_conv1d(model: nn.Module) -> int:
    """Swap every transformers ``Conv1D`` of ``model`` for :class:`Conv1D` in place; returns how many."""
    return swap_class(model, _HFConv1D, Conv1D)


def swap_class(model: nn.Module, stock: type, fast: type) -> int:
    """Give every module of exactly type ``stock`` the subclass ``fast`` in place (parameters and
    state-dict keys unchanged); returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is stock:
            module.__class__ = fast
            n += 1
    return n


def use_fast_linear(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` for :class:`Linear` in place; returns how many."""
    return swap_class(model, nn.Linear, Linear)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` of ``model`` for :class:`Dropout` in place; returns how many."""
    return swap_class(model, nn.Dropout, Dropout)
