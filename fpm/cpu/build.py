"""JIT builds of C++ ops (fpm's CPU kernels, DeepSpeed's CPU Adam) that cannot hang.

``torch.utils.cpp_extension.load`` serialises builds with a ``lock`` file in the op's build folder,
created with ``O_EXCL`` and removed when the build ends. A builder killed half-way (a time limit,
SIGKILL, Ctrl-C at the wrong moment, a node that died) leaves the file behind, and from then on
every process that loads the op waits on it forever, silently, at no CPU.

fpm holds an ``flock`` of its own (``fpm-build.flock`` beside it) around every load: the kernel
releases it when its holder dies, however it dies. So a ``lock`` file found while fpm holds the
flock belongs to no live fpm process: it is stale and is removed, and the build starts again. A
wait for a live builder longer than ``FPM_BUILD_WAIT_S`` seconds (default 900; a first build takes
30-60 s on 2 cores) stops with :class:`BuildWaitError`, naming the lock file and what to do; the
callers then run without the op, as they do where it cannot be built. (A build by a process that
is not fpm — plain DeepSpeed in the same folder — holds no flock; fpm would take its ``lock`` for
stale. Keep such builds in another ``TORCH_EXTENSIONS_DIR``.)

The ops are built in ``TORCH_EXTENSIONS_DIR``, by default the environment's own folder
(``<sys.prefix>/torch_extensions``), where ``make install`` builds them (``python -m
fpm.cpu.prebuild``): a run in that environment loads them and never compiles.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

BUILD_WAIT_S = 900.0


class BuildWaitError(RuntimeError):
    pass


def extensions_dir() -> Path:
    """Where the JIT-built ops live: ``TORCH_EXTENSIONS_DIR``, set to the environment's own folder
    when unset (process-wide, so that DeepSpeed's op builder uses it too)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def build_dir(name: str) -> Path:
    """The folder torch builds op ``name`` in (its ``lock`` file lives there)."""
    extensions_dir()
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


@contextlib.contextmanager
def guarded(name: str, wait_s: float | None = None):
    """Around ``load(name, ...)``: wait (at most ``wait_s``) for any live fpm builder of ``name``,
    then remove a ``lock`` no live process holds."""
    folder = build_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    if wait_s is None:
        wait_s = float(os.environ.get("FPM_BUILD_WAIT_S", BUILD_WAIT_S))
    lock = folder / "lock"
    with open(folder / "fpm-build.flock", "a") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BuildWaitError(
                        f"waited {wait_s:.0f} s for another process building {name} (lock {lock}); if no fpm "
                        f"process is running, delete {folder} and run `python -m fpm.cpu.prebuild`") from None
                time.sleep(0.2)
        try:
            if lock.exists():
                from fpm.console import warn

                warn(f"{lock} was left by a build of {name} that was killed half-way (no process is building it "
                     "now): removed with that build's files; building again")
                for path in folder.iterdir():  # a killed compiler may leave a truncated object file
                    if path.name != "fpm-build.flock":
                        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_shm_comm() -> None:
    """DeepSpeed's shared-memory collectives for CPU ranks (``deepspeed_shm_comm``), which
    ``deepspeed.init_distributed`` JIT-builds on first use: loaded (built if need be) here first,
    guarded, so that DeepSpeed's own load finds it ready. Nothing where DeepSpeed would not use it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    with guarded(builder.name):
        builder.load(verbose=False)
