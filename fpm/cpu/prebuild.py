"""Build the JIT-compiled C++ ops once, all at the same time, into the environment's own folder
(:mod:`fpm.cpu.build`): fpm's CPU kernels, DeepSpeed's CPU Adam and its shared-memory collectives
(``python -m fpm.cpu.prebuild``; `make install` runs it). Each takes 30-70 s of compiling on a
fresh 2-core machine; the first training process would otherwise build them one after the other.
Where a build fails (no compiler), training falls back as it always does, so this never fails the
install."""

from __future__ import annotations

import subprocess
import sys
import time

BUILDS = {
    "fpm CPU kernels": "from fpm.cpu import kernels; assert kernels.extension() is not None",
    "DeepSpeed CPU Adam": "from fpm.cpu.adam import ResumableCPUAdam; ResumableCPUAdam.load_op()",
    "DeepSpeed shared-memory collectives": "from fpm.cpu.build import load_shm_comm; load_shm_comm()",
}


def main() -> int:
    t0 = time.time()
    procs = {name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True) for name, code in BUILDS.items()}
    for name, proc in procs.items():
        _, err = proc.communicate()
        status = "ready" if proc.returncode == 0 else f"not built ({(err.strip().splitlines() or ['?'])[-1][:120]})"
        print(f"{name}: {status}")
    print(f"C++ ops: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
