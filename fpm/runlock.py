"""One writer per output directory.

``fpm pretrain``, ``fpm finetune``, ``fpm data prepare`` and ``fpm sweep-depth`` take an exclusive
lock on their ``--out`` before writing anything: ``DIR/.fpm.lock``, holding who took it (command,
host, PID, time), locked with a POSIX record lock (``fcntl``). A second process on the same
directory exits 2 at once with a message naming the holder. The kernel releases the lock the
moment its holder dies, however it dies (SIGKILL, OOM): a stale lock file is simply taken over.
A record lock belongs to the process, not to its children: ``flock`` would be inherited by the
DataLoader workers and the tokenizer pool, which outlive a killed main process by seconds and
would refuse the rerun meant to resume. NFS supports these locks through its lock manager; where
a file system supports none, the file's contents decide: a holder on this host whose PID no
longer runs is stale and replaced; a holder on another host is respected.

Only one process per job takes the lock (rank 0); the other ranks write only inside what rank 0
created.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from fpm.errors import FpmError, disk_error

LOCK_FILE = ".fpm.lock"
_HELD: dict[str, dict] = {}  # lock files this process holds


def _holder_text(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"{info.get('command', 'fpm')} (PID {info.get('pid', '?')} on {info.get('host', '?')}, since {when})"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, folder: Path | str, command: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command or "fpm " + " ".join(sys.argv[1:3])
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise disk_error(exc) from None
        key = os.path.realpath(self.path)
        if key in _HELD:  # POSIX locks never conflict within one process: check here
            os.close(fd)
            raise FpmError(f"{self.folder} is in use by {_holder_text(_HELD[key])}")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                holder = self._read(fd)
                os.close(fd)
                raise FpmError(f"{self.folder} is in use by {_holder_text(holder)}; wait for it to finish or "
                               f"choose another --out") from None
            # no locks on this file system: decide by the file's contents
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise disk_error(exc) from None
            holder = self._read(fd)
            if holder and not self._stale(holder):
                os.close(fd)
                raise FpmError(f"{self.folder} is in use by {_holder_text(holder)}; wait for it to finish, or "
                               f"delete {self.path} if that process is gone") from None
        info = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd, self._key = fd, key
        _HELD[key] = info
        return self

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        return not _pid_alive(int(holder.get("pid", 0) or 0))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the lock
        self._fd = None
        _HELD.pop(self._key, None)
        if [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:  # the command wrote nothing: leave nothing
            try:
                self.path.unlink()
                self.folder.rmdir()
            except OSError:
                pass
