"""What makes training fast on a CPU, in one place; none of it runs on a GPU.

* :mod:`.kernels` — dropout, attention, linear layers and the fused vocabulary loss with fpm's C++
  kernels (``csrc/cpu_kernels.cpp``), each checked against PyTorch before use; on a GPU (or
  without a compiler) they are PyTorch's own calls.
* :mod:`.bert_unpadded` — BERT's encoder without work on padding positions.
* :mod:`.master` — flat fp32 master weights for bf16 without ZeRO (one pass per step).
* :mod:`.allocator` — tcmalloc/jemalloc for the training commands.

:func:`speed_up` swaps a built model's modules for the fast ones in one call, on a CPU only; the
model's parameters (hence checkpoints and exports) are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from fpm.cpu import kernels


def speed_up(model: nn.Module, device: torch.device | None = None) -> list[str]:
    """Swap ``model``'s dropout and linear layers (and GPT-2's ``Conv1D``) for fpm's CPU ones when
    it will train on a CPU (``device``, by default: no CUDA device here); returns what was swapped."""
    on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
    if not on_cpu:
        return []
    kernels.use_fast_dropout(model)
    kernels.use_fast_linear(model)
    kernels.use_fast_conv1d(model)
    return ["dropout", "linear", "conv1d"]
