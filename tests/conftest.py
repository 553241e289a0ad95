"""Shared test helpers. Tests build their own fixtures; none reads ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture
def fpm():
    return run_fpm
