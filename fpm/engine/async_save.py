"""Checkpoints written in the background: training waits only for the copy to host memory.

DeepSpeed writes every checkpoint file through its engine's checkpoint engine
(``save(state_dict, path)``). :class:`BackgroundWriter` is such an engine: ``save`` copies every
tensor of the state to host memory — the only part training waits for — and queues the file; a
thread of each rank writes the queued files in order, checksumming the bytes as it writes them (size
and CRC32), so sealing needs no second pass over the checkpoint. :class:`fpm.engine.checkpoint.Checkpointer` seals the checkpoint,
and moves ``latest``, only when every rank's writer has finished; until then the previous
checkpoint is the one a restart resumes. A save that fails in the background is raised at the
seal, where the trainer reports it like a failed synchronous save.

Host memory: the copy holds this rank's share of the checkpoint until it is written (at CPM-X-L's
size on 8 ranks, ~18 GB per rank).
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine



def host_copy(obj):
    """``obj`` with every tensor copied to host memory (compact: a view becomes its own tensor, as
    DeepSpeed's ``clone_tensors_for_torch_save`` makes it); containers rebuilt, the rest shared."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if type(obj) is OrderedDict:
        return OrderedDict((k, host_copy(v)) for k, v in obj.items())
    if type(obj) is dict:
        return {k: host_copy(v) for k, v in obj.items()}
    if type(obj) is list:
        return [host_copy(v) for v in obj]
    if type(obj) is tuple:  # not a subclass: torch.Size (DeepSpeed's param_shapes) must stay one
        return tuple(host_copy(v) for v in obj)
    return obj


class _Checksummed:
    """A file the writer writes through: size and CRC32 of the bytes as they go by (no second read)."""

    def __init__(self, fh):
        self.fh, self.size, self.crc = fh, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


class BackgroundWriter(TorchCheckpointEngine):
    """DeepSpeed's checkpoint-engine interface, writing on a thread of its own."""

    def __init__(self):
        super().__init__(None)
        self.name = "fpm.BackgroundWriter"
        self._queue: queue.Queue = queue.Queue()
        self._written: dict[str, list[int]] = {}
        self._error: BaseException | None = None
        self.blocking_s = 0.0  # time save() held the caller since the last wait()
        self._thread = threading.Thread(target=self._run, name="fpm-checkpoint-writer", daemon=True)
        self._thread.start()

    def preserves_storage_sharing(self) -> bool:
        return False  # host_copy makes every tensor compact: DeepSpeed need not clone first

    def save(self, state_dict, path: str) -> None:
        t0 = time.perf_counter()
        item = (host_copy(state_dict), Path(path))
        self.blocking_s += time.perf_counter() - t0
        self._queue.put(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                state, path = item
                if self._error is None:  # after a failure the rest of this checkpoint is not written
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "wb") as fh:
                        out = _Checksummed(fh)
                        torch.save(state, out)
                    self._written[str(path)] = [out.size, out.crc]
                del state, item
            except BaseException as exc:  # raised in the training thread by wait()
                self._error = exc
            finally:
                self._queue.task_done()

    def idle(self) -> bool:
        """Whether every queued file has been written (or failed)."""
        return self._queue.unfinished_tasks == 0

    def wait(self) -> dict[str, list[int]]:
        """Block until the queue is written; ``{path: [size, crc32]}`` of the files written since
        the last wait, or the first error of the writer thread."""
        self._queue.join()
        written, self._written = self._written, {}
        error, self._error = self._error, None
        if error is not None:
            raise error
        return written

    def close(self, wait: bool = True) -> None:
        """Stop the thread once the queue is written (``wait``), or leave it (a daemon) to the exit."""
        if self._thread.is_alive():
            self._queue.put(None)
            if wait:
                self._thread.join()
