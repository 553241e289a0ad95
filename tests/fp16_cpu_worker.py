"""``python -m fpm.engine.layouts`` with fp16 allowed on the CPU, for tests/test_equivalence.py.

DeepSpeed refuses fp16 on a CPU whose oneDNN lacks native fp16 (``is_fp16_supported()``); PyTorch
still computes in float16 there, slowly. The fp16 test runs DeepSpeed's fp16 code paths in real
float16 arithmetic by letting the CPU accelerator say yes; nothing else changes.
"""

import sys

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

CPU_Accelerator.is_fp16_supported = lambda self: True

from fpm.engine.layouts import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
