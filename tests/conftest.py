"""Shared test helpers and the test tiers. Tests build their own fixtures; none reads ../shared/data.

Tiers (markers; an unmarked test is ``unit``):

* ``unit``   in this process: logic, configuration, usage errors through ``main()`` (:func:`run_main`)
* ``cli``    the command line in a fresh process, training nothing
* ``e2e``    trains a tiny model end to end (one process)
* ``system`` torchrun matrices, a real SLURM, the GPU check's ``--cpu`` mode, the README's block,
             a killed C++ build

``make test-fast`` runs unit and cli, ``make test`` everything but system, ``make test-system`` the
system tier; CI runs both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the ops JIT-built once by `make install` (fpm.cpu.prebuild), also for a test that reaches DeepSpeed's
# op builder before fpm does (else it builds CPU Adam again into ~/.cache: minutes)
from fpm.cpu.build import extensions_dir  # noqa: E402

extensions_dir()


def _share_the_cores() -> None:
    """Under pytest-xdist every worker trains: each gets its share of the cores (``FPM_THREADS``, read
    by :func:`fpm.engine.distributed.cpu_threads`; its subprocesses inherit it) instead of every
    worker's runs taking all of them (two 2-thread trainings on 2 cores ran 3-5x slower each)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "FPM_THREADS" not in os.environ:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["FPM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores()


def run_fpm(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as a user would) and capture its output."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "fpm", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fpm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def sigkill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, tag: str, timeout: float = 600) -> None:
    """SIGKILL ``proc`` (an `fpm pretrain`) as soon as its ``latest`` names ``tag`` or a later one."""
    import signal
    import time

    latest, t0 = Path(run_dir) / "checkpoints" / "latest", time.time()
    while not (latest.is_file() and latest.read_text().strip() >= tag):
        assert proc.poll() is None and time.time() - t0 < timeout, f"the run ended before its checkpoint {tag}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_main(*args: str, env: dict | None = None, cwd: Path | None = None, check: bool = False,
             timeout: float | None = None) -> subprocess.CompletedProcess:
    """The command line in this process: ``fpm.cli.main()`` with ``argv``, its output and exit code
    captured as a subprocess's would be — without the seconds a fresh interpreter spends importing
    torch. For commands that train nothing (the allocator stays the system's: no re-exec)."""
    import contextlib
    import io

    from fpm.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    os.environ.update({"FPM_ALLOCATOR": "system", **(env or {})})
    sys.argv = ["fpm", *map(str, args)]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    proc = subprocess.CompletedProcess(["fpm", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"fpm {' '.join(map(str, args))} failed ({code}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def fpm():
    """The command line in a fresh process (:func:`run_fpm`)."""
    return run_fpm


@pytest.fixture
def cli():
    """The command line in this process (:func:`run_main`)."""
    return run_main


TIERS = ("cli", "e2e", "system")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
