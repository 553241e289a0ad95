"""What makes training fast on a CPU, in one place, applied to a built model in one call.

* :mod:`.kernels` — dropout, attention, linear layers and the fused vocabulary loss with fpm's C++
  kernels (``csrc/cpu_kernels.cpp``), each checked against PyTorch before use; on a GPU (or
  without a compiler) they are PyTorch's own calls.
* :mod:`.bert_attention` — BERT's SDPA attention on those kernels.
* :mod:`.bert_unpadded` — BERT's encoder without work on padding positions.
* :mod:`.master` — flat fp32 master weights for bf16 without ZeRO (one pass per step; chosen by
  the engine, :func:`fpm.engine.setup.flat_master`).
* :mod:`.allocator` — tcmalloc/jemalloc for the training commands.

:func:`fpm.cpu.speed.speed_up` is the one call: the model's parameters (hence checkpoints and
exports) are untouched, and the model files (:mod:`fpm.models`) know nothing of it.

This file imports nothing: a command that only needs the allocator (every training command, before
it parses its arguments) or the build guard must not pay for torch and transformers.
"""

