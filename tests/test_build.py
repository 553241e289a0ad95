"""Builds of the C++ ops that cannot hang (fpm.cpu.build): a lock left by a killed builder is taken
over, a live builder is waited for at most a limit, and a first build killed half-way (SIGKILL)
leaves a machine that still builds and trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpm.cpu import build


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext"


def test_a_lock_no_live_process_holds_is_removed_with_its_builds_files(ext_dir):
    folder = build.build_dir("some_op")
    assert folder.parent == ext_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()  # as torch leaves it when its builder is killed
    (folder / "half.o").write_bytes(b"\0" * 10)
    with build.guarded("some_op", wait_s=5):
        assert not (folder / "lock").exists() and not (folder / "half.o").exists()
        (folder / "op.so").touch()
    # a finished build is left alone
    with build.guarded("some_op", wait_s=5):
        assert (folder / "op.so").exists()


def test_a_live_builder_is_waited_for_at_most_the_limit_and_the_error_names_the_lock(ext_dir):
    folder = build.build_dir("busy_op")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(folder / 'fpm-build.flock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(build.BuildWaitError) as err:
            with build.guarded("busy_op", wait_s=1.0):
                pass
        assert 1.0 <= time.monotonic() - t0 < 10
        assert str(folder / "lock") in str(err.value) and "prebuild" in str(err.value)
        assert (folder / "lock").exists()  # a live builder's lock is not touched
    finally:
        holder.kill()
        holder.wait()
    with build.guarded("busy_op", wait_s=5):  # its holder is gone: the lock is stale now
        assert not (folder / "lock").exists()


@pytest.mark.system
def test_a_first_build_killed_half_way_then_a_tiny_pretraining_builds_and_trains(ext_dir, tmp_path, fpm):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir)}
    lock = build.build_dir("fpm_cpu_kernels") / "lock"
    builder = subprocess.Popen([sys.executable, "-c", "from fpm.cpu import kernels; kernels.extension()"],
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lock.exists(), "the build never started"
    time.sleep(3)  # the compiler is running
    os.killpg(builder.pid, signal.SIGKILL)  # the process and its compiler: a time limit, a dead node
    builder.wait()
    assert lock.exists()  # what torch leaves behind, on which every later load used to wait forever
    proc = fpm("pretrain", "cpm-x-s", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "2",
               env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "killed half-way" in proc.stderr and "fpm_cpu_kernels" in proc.stderr
    assert "could not be built" not in proc.stderr  # built again, and used
    assert not lock.exists() and list(Path(lock.parent).glob("*.so"))
