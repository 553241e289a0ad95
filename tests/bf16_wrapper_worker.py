"""``python -m fpm.engine.layouts`` with fpm's flat master weights off, for tests/test_equivalence.py.

bf16 without ZeRO on a CPU normally trains on fpm's flat fp32 master weights; on a GPU it runs
DeepSpeed's own wrapper (FP16_UnfusedOptimizer in bf16), which is also what a CPU falls back to
when DeepSpeed's CPU Adam cannot be built. This runs that wrapper on the CPU.
"""

import sys

from fpm.engine import setup

setup.flat_master = lambda spec, have_cpu_adam: False

from fpm.engine.layouts import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
