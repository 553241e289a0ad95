"""The pieces behind clean exits, in-process and fast: the run lock, one-line messages from
wrapped errors, disk errors from libraries that hide their errno, text checks, the stop flag."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from fpm.data.readers import check_text_input
from fpm.engine.signals import StopFlag
from fpm.errors import DiskError, FpmError, disk_errno, disk_error, one_line
from fpm.runlock import LOCK_FILE, RunLock


def _hold(run, command: str, then: str) -> str:
    return (f"import os, sys, time; sys.path.insert(0, {os.getcwd()!r}); from fpm.runlock import RunLock; "
            f"lock = RunLock({str(run)!r}, {command!r}).acquire(); {then}")


def test_a_second_lock_on_the_same_folder_names_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _hold(run, "fpm pretrain bert-e-l", "print(1, flush=True); "
                                                                                       "time.sleep(60)")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        with pytest.raises(FpmError, match=rf"is in use by fpm pretrain bert-e-l \(PID {holder.pid} on "
                                           rf"{socket.gethostname()}"):
            RunLock(run, "fpm pretrain other").acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(run).acquire().release()  # its holder is gone: free again


def test_one_process_cannot_take_its_own_lock_twice(tmp_path):
    with RunLock(tmp_path / "run", "fpm sweep-depth x"):
        with pytest.raises(FpmError, match="is in use by fpm sweep-depth x"):
            RunLock(tmp_path / "run").acquire()


def test_a_forked_child_does_not_hold_the_lock(tmp_path):
    """DataLoader workers and tokenizer pools are forked from the process holding the lock: when
    it is killed they live on for seconds, and must not keep its rerun out."""
    run = tmp_path / "run"
    code = _hold(run, "fpm pretrain parent", "pid = os.fork()\nif pid == 0: time.sleep(30); os._exit(0)\n"
                                            "print(pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: the child lives on
    parent.wait()
    try:
        os.kill(child, 0)  # still alive
        RunLock(run, "fpm pretrain rerun").acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_lock_whose_holder_died_is_taken_over(tmp_path):
    run = tmp_path / "run"
    code = _hold(run, "fpm pretrain dead", "os._exit(0)")  # dies holding it
    subprocess.run([sys.executable, "-c", code], check=True)
    holder = json.loads((run / LOCK_FILE).read_text())
    assert holder["command"] == "fpm pretrain dead"  # the stale file is still there
    with RunLock(run, "fpm pretrain alive"):
        assert json.loads((run / LOCK_FILE).read_text())["command"] == "fpm pretrain alive"


def test_a_lock_that_wrote_nothing_leaves_nothing(tmp_path):
    RunLock(tmp_path / "new").acquire().release()
    assert not (tmp_path / "new").exists()


def test_an_error_from_a_dataloader_worker_is_one_line():
    wrapped = FpmError("Caught FpmError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                       "last):\n  File \"x.py\", line 1, in f\n    raise FpmError(...)\nfpm.errors.FpmError: "
                       "data/shard_00000.bin: damaged; prepare it again\n")
    assert one_line(wrapped) == "data/shard_00000.bin: damaged; prepare it again"


def test_disk_errors_hidden_in_library_exceptions_are_found():
    assert disk_errno(Exception("No space left on device (os error 28)")) == errno.ENOSPC  # tokenizers (Rust)
    assert disk_errno(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")) == \
        errno.ENOSPC  # torch.save
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/x")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert disk_errno(outer) == errno.EROFS
    assert disk_errno(ValueError("no")) is None
    err = disk_error(OSError(errno.ENOSPC, "No space left on device", "/runs/x"))
    assert isinstance(err, DiskError) and err.exit_code == 74 and str(err) == "/runs/x: the disk is full"
    missing = disk_error(OSError(errno.ENOENT, "No such file or directory", "/nope"))
    assert type(missing) is FpmError and missing.exit_code == 2


@pytest.mark.parametrize("content, says", [(b"", "empty (0 bytes)"), (b" \n\n\t", "empty (whitespace only)"),
                                           (b"abc\x00def", "binary data (a NUL byte at offset 3)"),
                                           (b"caf\xe9 au lait " * 10, "not UTF-8 text (byte 3")])
def test_text_inputs_that_cannot_hold_a_corpus(tmp_path, content, says):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(FpmError, match="corpus.txt: " + re.escape(says)):
        check_text_input(path)


def test_utf8_cut_at_the_end_of_the_sniffed_block_is_text(tmp_path):
    path = tmp_path / "zh.txt"
    path.write_bytes(("中文" * 20000).encode())  # 120 kB: the 64 KiB sniff ends inside a character
    check_text_input(path)


def test_ctrl_c_once_stops_at_the_step_twice_aborts():
    flag = StopFlag()
    flag.signal = None
    flag._handler(signal.SIGINT, None)
    assert flag.requested
    with pytest.raises(KeyboardInterrupt):
        flag._handler(signal.SIGINT, None)
    other = StopFlag()
    other.signal = None
    other._handler(signal.SIGTERM, None)
    other._handler(signal.SIGTERM, None)  # SIGTERM twice is still a request to save
    assert other.signal == signal.SIGTERM
