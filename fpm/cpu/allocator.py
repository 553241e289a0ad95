"""Run training commands on tcmalloc (else jemalloc) instead of glibc's malloc, as PyTorch's own CPU
launcher does (``python -m torch.backends.xeon.run_cpu --enable-tcmalloc``).

Why: a training step allocates every activation afresh and frees it in the backward pass. glibc
serves blocks above its mmap threshold (at most 32 MB, often less) with a fresh ``mmap`` and
returns them to the kernel when freed, so each step page-faults its activations in again —
10,000-45,000 faults a step on the benchmark's BERT shape, and a fresh 16 MB GELU output costs
6.9 ms against 2.7 ms in reused memory. tcmalloc keeps freed memory for reuse: the same step
measured 669-714 ms against 728-796 ms with glibc, three alternating runs each
(``bench/RESULTS.md``).

An allocator has to be in place before the process starts, so :func:`reexec` re-executes the
command once with ``LD_PRELOAD`` set (the PID stays the same, which torchrun and SLURM watch).
``FPM_ALLOCATOR`` chooses: ``auto`` (default: tcmalloc, else jemalloc, else glibc), ``tcmalloc``,
``jemalloc`` or ``system`` (leave the process alone). Debian/Ubuntu: ``apt install
libtcmalloc-minimal4`` (or ``libjemalloc2``); conda: ``conda install gperftools``.
Nothing here imports torch: it runs before anything heavy is loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "FPM_ALLOCATOR"
LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
_DONE = "FPM_ALLOCATOR_PRELOADED"  # set in the re-executed process: never re-execute twice


def search_dirs(environ: dict[str, str] | None = None) -> list[Path]:
    env = os.environ if environ is None else environ
    dirs = [Path(sys.prefix) / "lib"]
    if env.get("CONDA_PREFIX"):
        dirs.append(Path(env["CONDA_PREFIX"]) / "lib")
    dirs += [Path(p) for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    machine = os.uname().machine
    dirs += [Path(f"/usr/lib/{machine}-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]
    return dirs


def find(kind: str, dirs: list[Path] | None = None) -> Path | None:
    """The first library file of ``kind`` (tcmalloc or jemalloc) in ``dirs``."""
    for d in dirs if dirs is not None else search_dirs():
        for name in LIBRARIES[kind]:
            if (d / name).is_file():
                return d / name
    return None


def preloaded(environ: dict[str, str] | None = None) -> str | None:
    """Which of the allocators ``LD_PRELOAD`` already names, if any."""
    value = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
    return next((kind for kind in LIBRARIES if kind in value), None)


def in_use() -> str:
    """The allocator mapped into this process: tcmalloc, jemalloc or glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return preloaded() or "unknown"
    return next((kind for kind in LIBRARIES if kind in maps), "glibc")


def preload_env(environ: dict[str, str] | None = None, dirs: list[Path] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or ``None`` when nothing should change: ``system``
    chosen, already re-executed, an allocator already preloaded, not Linux, or no library found."""
    env = dict(os.environ if environ is None else environ)
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "system", *LIBRARIES):
        from fpm.errors import FpmError

        raise FpmError(f"{ENV}={env[ENV]!r}: expected auto, tcmalloc, jemalloc or system")
    if choice == "system" or env.get(_DONE) or preloaded(env) or not sys.platform.startswith("linux"):
        return None
    for kind in (LIBRARIES if choice == "auto" else (choice,)):
        lib = find(kind, dirs if dirs is not None else search_dirs(env))
        if lib is not None:
            env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
            env[_DONE] = kind
            return env
    if choice != "auto":
        from fpm.errors import FpmError

        raise FpmError(f"{ENV}={choice}: none of {', '.join(LIBRARIES[choice])} found in "
                       f"{', '.join(str(d) for d in dirs or search_dirs(env))} (Debian/Ubuntu: apt install "
                       f"{'libtcmalloc-minimal4' if choice == 'tcmalloc' else 'libjemalloc2'}; or {ENV}=system)")
    return None


def reexec() -> None:
    """Re-execute this command with the allocator preloaded (no return), or return unchanged."""
    env = preload_env()
    if env is None:
        os.environ.setdefault(_DONE, "none")  # child processes (torchrun ranks, sweep cells) need not look again
        return
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
