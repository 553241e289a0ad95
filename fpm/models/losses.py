"""A fused, chunked "linear + cross-entropy" for large vocabularies.

Scoring every position of a GPT batch against 50k vocabulary entries materialises a logits tensor
of batch × sequence × vocabulary (823 MB in fp32 for 32 × 128 × 50,257), then a softmax of the same
size, then their gradients — memory traffic that costs more than the matrix multiply itself on a
CPU and a large share of the activation memory on a GPU. This computes the loss a chunk of rows at
a time and, since the gradient of cross-entropy is known in closed form (softmax − one-hot), the
gradients with respect to the hidden states and the output matrix in the same pass; only those are
kept for backward. The element-wise part of a chunk (softmax, loss, gradient, cast) is one fused
pass that overwrites the logits with their gradient in place: fpm's C++ kernel for bf16 on CPU,
a ``torch.compile``d function on a GPU (instead of about nine eager passes), else the eager one
(in place on a CPU: no chunk-sized temporaries). On CPU the logits of a chunk go to a scratch
buffer kept between calls: a fresh 37-206 MB tensor each step is a fresh ``mmap`` whose page
faults cost as much as the matrix multiply writing it (measured: the BERT bench's 614 × 30,522
logits in 23 ms into a new tensor, 11 ms into a reused one). The result is the mean cross-entropy
over positions whose label is not -100, equal to ``F.cross_entropy(linear(hidden), labels)`` up to
float rounding. Under ZeRO-3 it runs as the head's forward, DeepSpeed gathering the weight around
it (:func:`linear_cross_entropy`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from fpm.cpu import kernels

CHUNK = 2048
TRANSPOSED_MIN_ROWS = 1024  # fewer rows (BERT's masked 15%): one transpose of W costs what it saves


def _transposable(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return (hidden.device.type == "cpu" and weight.dtype == hidden.dtype and weight.element_size() == 2
            and kernels.extension() is not None)


def _chunk_grad(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """Summed loss over rows with scale > 0; overwrites ``logits`` with d loss / d logits × scale.
    ``bias`` is added to the logits first (in fp32, fused with the rest)."""
    x = logits.float() if bias is None else logits.float() + bias.float()
    top = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - top)
    norm = e.sum(dim=-1, keepdim=True)
    lse = (top + norm.log()).squeeze(1)
    picked = x.gather(1, target[:, None]).squeeze(1)
    loss = ((lse - picked) * (scale > 0)).sum()
    onehot = torch.zeros_like(x).scatter_(1, target[:, None], 1.0)
    logits.copy_(((e / norm - onehot) * scale[:, None]).to(logits.dtype))
    return loss


def _chunk_grad_in_place(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None):
    """:func:`_chunk_grad` with no chunk-sized temporary for fp32 logits without a bias (one, the
    fp32 copy, otherwise): the same operations in the same order, each in place, so the same bits.
    The eager one holds about five chunk-sized tensors at its peak (x - top, e, the one-hot,
    e / norm, their difference): under ZeRO-3 on a CPU in fp32 (measured by
    ``bench/zero3_loss_memory.py``, GPT, 2,048 rows of a 50,257 vocabulary, one chunk) the fused
    loss peaked 1.3x *above* the unfused one with it."""
    x = logits.float() if bias is None else logits.float() + bias.float()  # fp32 logits: x is logits
    top = x.amax(dim=-1, keepdim=True)
    rows = target[:, None]
    picked = x.gather(1, rows).squeeze(1)
    e = x.sub_(top).exp_()
    norm = e.sum(dim=-1, keepdim=True)
    lse = (top + norm.log()).squeeze(1)
    loss = ((lse - picked) * (scale > 0)).sum()
    e.div_(norm)
    e.scatter_(1, rows, e.gather(1, rows) - 1.0)  # - one-hot: x - 0 is x, bit for bit
    e.mul_(scale[:, None])
    if e is not logits:
        logits.copy_(e)
    return loss


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _logits_buffer(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] tensor for a chunk's logits: on CPU a view of a buffer reused across calls."""
    if like.device.type != "cpu":
        return torch.empty(rows, cols, dtype=like.dtype, device=like.device)
    key = (like.dtype, like.device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = _SCRATCH[key] = torch.empty(rows * cols, dtype=like.dtype, device=like.device)
    return buf[:rows * cols].view(rows, cols)


_COMPILED = None


def _chunk_fn(device: torch.device):
    """The compiled chunk function (probed on ``device`` against the eager one), or the eager one
    when compiling is off or fails."""
    global _COMPILED
    if _COMPILED is None:
        if os.environ.get("FPM_NO_COMPILE") == "1":
            _COMPILED = _chunk_grad
        else:
            try:
                compiled = torch.compile(_chunk_grad, dynamic=None)
                probe, want = torch.zeros(2, 3, device=device), torch.zeros(2, 3, device=device)
                target, scale = torch.zeros(2, dtype=torch.long, device=device), torch.ones(2, device=device)
                compiled(probe, target, scale)
                _chunk_grad(want, target, scale)
                _COMPILED = compiled if torch.allclose(probe, want) else _chunk_grad
            except Exception:  # no C++ compiler / triton here: the eager path is exact, only slower
                _COMPILED = _chunk_grad
    return _COMPILED


def _chunk_fn_for(hidden: torch.Tensor):
    """On a CPU, fpm's C++ kernel for bf16 logits (one pass per row), else the eager function: a
    compile costs 5-25 s in every process and saves nothing at the sizes a CPU trains in fp32. On a
    GPU, the compiled one (one fused kernel instead of about nine passes)."""
    if hidden.device.type != "cpu":
        return _chunk_fn(hidden.device)
    ext = kernels.extension() if hidden.dtype == torch.bfloat16 else None
    if ext is None:
        return _chunk_grad_in_place

    def fn(logits, target, scale, bias=None):
        b = None if bias is None else bias.float().contiguous()
        return torch.tensor(ext.xent_grad16(logits, target.contiguous(), scale.float().contiguous(), b))
    return fn


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                chunk: int):
        n = hidden.shape[0]
        ok_all = labels != -100
        inv_valid = 1.0 / ok_all.sum().clamp(min=1).float()
        grad_h = torch.empty_like(hidden)
        # the weight gradient: the first chunk's product, later chunks added into it in the weight's
        # dtype (one rounding per chunk, as DeepSpeed's bf16 gradient accumulation across micro-batches;
        # converting each chunk's product to fp32 and back cost 65 ms a step on the GPT bench shape)
        grad_w = None
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        fn = _chunk_fn_for(hidden)
        logits_buf = _logits_buffer(min(chunk, n), weight.shape[0], hidden) if n else None
        # on CPU in 16 bits with enough rows (GPT: every position), the matmuls take the contiguous
        # transpose Wᵀ (one copy per step) and the weight gradient is accumulated transposed, as
        # (hᵀ; 1)·g — contiguous operands run ~1.6x faster here, and the row of ones gives the bias
        # gradient; measured on the GPT bench's 4,096 x 50,257 head: -107 ms a step
        transposed = n >= TRANSPOSED_MIN_ROWS and _transposable(hidden, weight)
        wt = kernels.transpose(weight) if transposed else None
        # fewer rows (BERT's masked positions) on CPU in 16 bits: the logits' gradient is transposed
        # instead (g·W as Wᵀ·gᵀ and gᵀ·h: 36 -> 30 ms for 560 x 30,522 rows, measured)
        small_t = not transposed and _transposable(hidden, weight)
        for s in range(0, n, chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            ok = ok_all[s:s + chunk]
            g = logits_buf[:h.shape[0]]
            kernels.mm(h, wt if transposed else weight.t(), out=g)
            total += fn(g, y.clamp(min=0), ok.float() * inv_valid, bias)  # g: logits -> their gradient
            if small_t:  # gᵀ once, then both products from contiguous operands (BERT: -6 ms a step)
                gt = kernels.transpose(g)
                grad_h[s:s + chunk] = kernels.transpose(kernels.mm(weight.t(), gt))
                grad_w = kernels.mm(gt, h) if grad_w is None else kernels.addmm_(grad_w, gt, h)
                if grad_b is not None:
                    grad_b.add_(g.sum(0))
                continue
            kernels.mm(g, weight, out=grad_h[s:s + chunk])
            if transposed:  # [d (+1), V]: Wᵀ's gradient (and the bias gradient in the last row)
                ht = kernels.transpose(h, ones_row=bias is not None)
                grad_w = kernels.mm(ht, g) if grad_w is None else kernels.addmm_(grad_w, ht, g)
            else:
                grad_w = kernels.mm(g.t(), h) if grad_w is None else kernels.addmm_(grad_w, g.t(), h)
                if grad_b is not None:
                    grad_b.add_(g.sum(0))  # accumulates in fp32 inside; sum(dtype=float32) converts g first (14x slower)
        if transposed and grad_w is not None:
            if bias is not None:
                grad_b = grad_w[-1].float()
            grad_w = kernels.transpose(grad_w[:weight.shape[1]])
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
        if grad_out.device.type != "cpu" or float(grad_out) != 1.0:  # the usual d loss/d loss = 1 needs no pass
            grad_h.mul_(grad_out)
            grad_w.mul_(grad_out)
            for g in grad_b:
                g.mul_(grad_out)
        return grad_h, grad_w, grad_b[0] if ctx.has_bias else None, None, None


class _LinearCrossEntropyLate(torch.autograd.Function):
    """The same loss for fp16, with the logits' gradient formed in backward.

    :class:`_LinearCrossEntropy` forms (softmax - one-hot) / N in the forward pass, before the loss
    scale is known, and rounds it to the weights' dtype there: in fp16 most entries of that tensor
    are below fp16's smallest subnormal (6e-8) for a large vocabulary and N, and the gradients lose
    them (measured: 96% of the output layer's weight-gradient entries exactly zero for 2,048 rows
    of GPT-2's vocabulary; ``bench/fp16_grads.py``). Here forward keeps only the loss, and backward
    recomputes each chunk's logits and forms the gradient in fp32 already multiplied by the
    incoming gradient — the loss scale — before rounding to fp16, as autograd does for the stock
    ``F.cross_entropy(linear(h))``. Costs one more matmul per chunk; fp16 only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int):
        ok = labels != -100
        inv_valid = 1.0 / ok.sum().clamp(min=1).float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            x = _chunk_logits(hidden[s:s + chunk], weight, bias)
            y, keep = labels[s:s + chunk].clamp(min=0), ok[s:s + chunk]
            total += ((torch.logsumexp(x, dim=-1) - x.gather(1, y[:, None]).squeeze(1)) * keep).sum()
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk, ctx.inv_valid = chunk, inv_valid
        return total * inv_valid

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels = ctx.saved_tensors
        chunk = ctx.chunk
        scale = (labels != -100).float() * (ctx.inv_valid * grad_out.float())
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk].clamp(min=0)
            g = torch.softmax(_chunk_logits(h, weight, bias), dim=-1)
            g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
            g.mul_(scale[s:s + chunk, None])
            g16 = g.to(hidden.dtype)
            torch.mm(g16, weight, out=grad_h[s:s + chunk])
            grad_w.add_((g16.t() @ h).float())  # summed over chunks in fp32
            if grad_b is not None:
                grad_b.add_(g.sum(0))
        return (grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype), None, None)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x = (h @ weight.t()).float()
    return x if bias is None else x + bias.float()


def linear_cross_entropy(hidden: torch.Tensor, linear: nn.Linear, labels: torch.Tensor,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Mean cross-entropy of ``linear(hidden)`` against ``labels`` (-100 ignored), fused and chunked.

    In fp16 the logits' gradient is formed in backward, after the loss scale
    (:class:`_LinearCrossEntropyLate`). Without a gradient to compute it calls the module (the
    plain loss). When the module's weight is a ZeRO-3 partition the fused loss runs *as the
    module's forward* (:func:`_as_forward_of`), so DeepSpeed gathers and releases the weight
    exactly as for ``linear(hidden)``: gathered around the forward, gathered again in backward
    while the weight's gradient is accumulated and reduce-scattered, released after. The fused
    path then holds no batch × vocabulary logits under ZeRO-3 either (issue 26; measured by
    ``bench/zero3_loss_memory.py``).
    """
    # not ``linear.weight``: inside DeepSpeed's forward, reading a ZeRO-3 partition as an attribute
    # outside its module's forward gathers it and registers it as an external parameter of the
    # module running (the whole objective), which then holds it gathered through every forward
    weight = dict(linear.named_parameters(recurse=False))["weight"]
    zero3 = hasattr(weight, "ds_id")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        return F.cross_entropy(linear(hidden).float(), labels, ignore_index=-100)
    fn = _LinearCrossEntropyLate if hidden.dtype == torch.float16 else _LinearCrossEntropy
    if zero3:
        return _as_forward_of(linear, lambda h, y: fn.apply(h, linear.weight, linear.bias, y, chunk), hidden, labels)
    return fn.apply(hidden, linear.weight, linear.bias, labels, chunk)


def _as_forward_of(module: nn.Module, forward, *args):
    """``forward(*args)`` called as ``module``'s forward, through ``module(*args)``: its hooks run
    around it — under ZeRO-3, DeepSpeed's: gather the module's parameters before, release them
    after, wrap the output so that backward gathers them again (the weight's gradient is
    accumulated into the full parameter, then reduce-scattered by ZeRO-3's hook) and release them
    once the inputs' gradients are out. The module keeps its class's forward afterwards."""
    own = module.__dict__.get("forward")
    module.forward = forward  # an instance attribute: nn.Module.__call__ takes self.forward
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


@torch.no_grad()
def token_losses(hidden: torch.Tensor, linear: nn.Module, labels: torch.Tensor,
                 chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of ``linear(hidden)`` against ``labels`` (0 where the label is -100)
    and whether the top prediction is the label, a chunk of rows at a time (evaluation: no
    gradient, never the whole logits tensor). Calls the module, so ZeRO-3 gathers its weight."""
    loss = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = linear(hidden[s:s + chunk]).float()
        y = labels[s:s + chunk]
        loss[s:s + chunk] = F.cross_entropy(logits, y, ignore_index=-100, reduction="none")
        correct[s:s + chunk] = (logits.argmax(-1) == y) & (y != -100)
    return loss, correct
