"""bf16 gradients summed across micro-batches in fp32 where DeepSpeed sums them in bf16 (ZeRO-0).

Under ZeRO 1-3 fpm asks DeepSpeed to accumulate bf16 gradients in fp32
(``data_types.grad_accum_dtype``, :mod:`fpm.engine.ds_config`). Without ZeRO DeepSpeed 0.19 refuses
that setting ("unsupported mix of model_dtype=bf16 and grad_accum_dtype=fp32"), and both of
fpm's ZeRO-0 bf16 paths — DeepSpeed's own wrapper on a GPU, fpm's flat master weights on a CPU
(:mod:`fpm.cpu.master`) — let autograd add each micro-batch's gradient into the parameter's bf16
``.grad``: with 8 bits of mantissa, the sum of 16 micro-batches loses the low bits of every term
added after the first (each addition rounds to 1 part in 256).

:class:`Fp32Accumulation` moves each micro-batch's gradient into an fp32 buffer as soon as autograd
has produced it (``register_post_accumulate_grad_hook``, the hook PyTorch documents for this) and,
at the end of the backward pass of the last micro-batch — before DeepSpeed all-reduces and steps —
hands the optimizer the fp32 sum rounded once to bf16. Cost: 4 bytes per parameter
(:func:`fpm.engine.memory.host_state_bytes` counts it) and one add per parameter per micro-batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import Variable


class Fp32Accumulation:
    """Sums the bf16 gradients of ``params`` in fp32 across the micro-batches of a step.

    ``is_boundary()`` says whether the backward pass now running is the step's last micro-batch
    (DeepSpeed's ``engine.is_gradient_accumulation_boundary``): after it, each parameter that
    received a gradient during the step holds the fp32 sum rounded to its own dtype; after the
    others, its ``.grad`` is ``None`` and the sum so far is kept here.
    """

    def __init__(self, params, is_boundary: Callable[[], bool]):
        self.params = [p for p in params if p.requires_grad and p.dtype == torch.bfloat16]
        self.is_boundary = is_boundary
        self.sums: dict[torch.Tensor, torch.Tensor] = {}
        self._touched: dict[torch.Tensor, None] = {}  # parameters with a gradient this step, in order
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._take) for p in self.params]

    def _take(self, p: torch.Tensor) -> None:
        if not self._queued:  # once per backward pass: finish after autograd's last hook
            Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued = True
        buf = self.sums.get(p)
        if buf is None:
            buf = self.sums[p] = torch.zeros_like(p, dtype=torch.float32)
        self._touched[p] = None
        buf.add_(p.grad)
        p.grad = None

    def _end_of_backward(self) -> None:
        self._queued = False
        if not self.is_boundary():
            return
        for p in self._touched:
            buf = self.sums[p]
            p.grad = buf.to(p.dtype)
            buf.zero_()
        self._touched.clear()

    def remove(self) -> None:
        """Detach the hooks (the parameters' gradients accumulate in their own dtype again)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
