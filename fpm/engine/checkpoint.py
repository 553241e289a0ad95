"""Checkpoints that resume exactly and never leave a broken ``latest``.

Layout under ``RUN/checkpoints/``::

    step-00000100/            DeepSpeed's files (model, optimizer/ZeRO partitions, scheduler, client state)
        rng/rank00000.pt      every RNG of every rank (python, numpy, torch CPU, CUDA)
        fpm_complete.json     written last: step, world size, size and CRC32 of every file
    latest                    the tag of the newest complete checkpoint, replaced atomically

A checkpoint counts only once ``fpm_complete.json`` exists, and ``latest`` moves only after that.

The checksums scale with the ranks: every file has an owner — the rank in its name
(``zero_pp_rank_R_…``, ``rng/rankR.pt``), else rank 0 (``mp_rank_00_model_states.pt``) — and the
checksums of a checkpoint are computed by the ranks in parallel, each over the files of the owners
``r`` with ``r % world_size == rank`` (so at 64 ranks each reads 1/64th, the files it just wrote);
rank 0 merges the ranks' inventories into the seal. On resume every rank checks the sizes of all
files and the checksums of its share (the files it reads), and the ranks agree: a damaged file is
reported by the rank that found it, and every rank falls back to the previous checkpoint.
``fpm checkpoint verify`` checks every file in one process.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fpm.console import warn
from fpm.engine.timeouts import while_rank0
from fpm.errors import DiskError, FpmError, disk_errno, disk_reason
from fpm.files import crc32_of

COMPLETE = "fpm_complete.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


_OWNER_RE = re.compile(r"zero_pp_rank_(\d+)_|^rng/rank(\d+)\.pt$")


def owner(rel: str) -> int:
    """The rank that wrote a checkpoint file (its name says; else rank 0)."""
    m = _OWNER_RE.search(rel)
    return int(m.group(1) or m.group(2)) if m else 0


def is_mine(rel: str, rank: int, world_size: int) -> bool:
    """Whether ``rank`` of ``world_size`` checks ``rel`` (the files of owners ``r % world_size == rank``)."""
    return owner(rel) % world_size == rank


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def inventory(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, list[int]]:
    """``{file: [size, crc32]}`` for this rank's share of ``folder`` (all of it on one rank)."""
    return {rel: [(folder / rel).stat().st_size, crc32_of(folder / rel)]
            for rel in _files(folder) if is_mine(rel, rank, world_size)}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_new_shape(seed: int, step: int, rank: int) -> None:
    """Every RNG of a rank resuming a checkpoint of another shape (fpm.engine.reshard): the old
    ranks' streams do not map onto the new ones, so they are a function of (seed, step, rank)."""
    s = (seed * 1_000_003 + step * 7_919 + rank) % 2**63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Pending:
    step: int
    folder: Path
    started: float  # perf_counter at the start
    blocking_s: float  # how long the start held training (the copy to host memory, or the whole write)


class Checkpointer:
    """The saves of one run. :meth:`start` is the part training waits for: DeepSpeed's files (and
    each rank's RNG state) handed to the background writer (:mod:`fpm.engine.async_save`) or
    written; :meth:`finish` waits for every rank's writer and seals — checksums merged, the seal
    written, ``latest`` moved, old checkpoints pruned. One save is in flight at a time; every rank
    calls :meth:`start`, :meth:`ready` and :meth:`finish` at the same steps (they are collective)."""

    def __init__(self, engine, ckpt_dir: Path, rank: int, world_size: int, keep_last: int, zero_stage: int = 0,
                 background: bool = False, on_sealed: Callable[[int, Path], None] | None = None):
        """``on_sealed(step, folder)``: called on rank 0 once a checkpoint is sealed, before older ones
        are pruned (the other ranks wait on the store meanwhile: it must be quick)."""
        self.engine, self.ckpt_dir, self.rank, self.world_size = engine, Path(ckpt_dir), rank, world_size
        self.keep_last, self.zero_stage, self.on_sealed = keep_last, zero_stage, on_sealed
        self.writer = None
        if background:
            from fpm.engine.async_save import BackgroundWriter

            self.writer = engine.checkpoint_engine = BackgroundWriter()
        self.pending: _Pending | None = None

    def start(self, step: int, client_state: dict) -> None:
        self.finish()
        self._disk_safe(step, lambda: self._start(step, client_state))

    def _start(self, step: int, client_state: dict) -> None:
        from fpm.engine.distributed import barrier

        folder = self.ckpt_dir / tag_for(step)
        if self.rank == 0 and folder.exists():  # a leftover of an interrupted save of this same step
            shutil.rmtree(folder)
        barrier()
        t0 = time.perf_counter()
        if self.writer is not None:
            self.writer.blocking_s = 0.0
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag_for(step), client_state=client_state,
                                    save_latest=False)
        rng_file = folder / "rng" / f"rank{self.rank:05d}.pt"
        if self.writer is not None:
            self.writer.save(rng_state(), str(rng_file))
        else:
            rng_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), rng_file)
        self.pending = _Pending(step, folder, t0, time.perf_counter() - t0)

    def ready(self, device=None) -> bool:
        """Whether the save in flight has been written by every rank (a collective, cheap)."""
        if self.pending is None:
            return False
        from fpm.engine.distributed import all_max

        busy = 0.0 if self.writer is None or self.writer.idle() else 1.0
        return all_max(busy, self.world_size, device) == 0.0

    def finish(self) -> Path | None:
        """Wait for the save in flight on every rank and seal it; its folder (None: none in flight)."""
        if self.pending is None:
            return None
        p = self.pending
        self._disk_safe(p.step, lambda: self._finish(p))
        return p.folder

    def seal(self) -> int | None:
        """:meth:`finish`, returning the step sealed (None: nothing was in flight)."""
        pending = self.pending
        return self.finish() and pending.step

    def _finish(self, p: _Pending) -> None:
        self.pending = None
        if self.writer is not None:  # each rank checksummed what it wrote
            mine = {str(Path(path).relative_to(p.folder)): v for path, v in self.writer.wait().items()}
        else:
            from fpm.engine.distributed import barrier

            barrier()  # every rank has written: each checksums its share
            mine = inventory(p.folder, self.rank, self.world_size)
        parts = gather_objects({"files": mine, "blocking_s": p.blocking_s}, self.world_size)
        files = dict(sorted(kv for part in parts for kv in part["files"].items()))
        timing = {"blocking_s": max(part["blocking_s"] for part in parts),
                  "total_s": time.perf_counter() - p.started, "bytes": sum(size for size, _ in files.values())}

        def seal_and_prune() -> None:
            seal = {"step": p.step, "world_size": self.world_size, "zero_stage": self.zero_stage, "files": files,
                    "timing": timing}
            tmp = p.folder / (COMPLETE + ".tmp")
            tmp.write_text(json.dumps(seal))
            os.replace(tmp, p.folder / COMPLETE)
            latest_tmp = self.ckpt_dir / (LATEST + ".tmp")
            latest_tmp.write_text(p.folder.name)
            os.replace(latest_tmp, self.ckpt_dir / LATEST)
            if self.on_sealed is not None:
                self.on_sealed(p.step, p.folder)
            for old in sorted(complete_tags(self.ckpt_dir))[:-self.keep_last]:
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
                shutil.rmtree(self.ckpt_dir / "universal" / old, ignore_errors=True)  # its conversion (reshard)

        # pruning old checkpoints on a shared file system can take long: not inside a collective window
        while_rank0(seal_and_prune, f"sealing {p.folder}", self.rank, self.world_size)

    def _disk_safe(self, step: int, work) -> None:
        """Run a part of a save, or explain on one line why the storage refused it: the partial folder
        is removed and ``latest`` still names the last intact checkpoint, which a rerun resumes from."""
        try:
            work()
        except Exception as exc:
            code = disk_errno(exc)
            if code is None:
                raise
            self.pending = None
            folder = self.ckpt_dir / tag_for(step)
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            intact = complete_tags(self.ckpt_dir)
            kept = (f"{self.ckpt_dir / LATEST} still names {intact[-1]} (intact): make room and rerun the same "
                    "command to resume from it") if intact else "no earlier checkpoint exists"
            raise DiskError(f"{folder}: the checkpoint of step {step} could not be written ({disk_reason(code)}); "
                            f"{kept}") from None

    def abandon(self) -> Path | None:
        """Forget the save in flight (an error ends the run): its folder stays unsealed, never resumed."""
        p, self.pending = self.pending, None
        return p.folder if p else None

    def close(self, wait: bool = True) -> None:
        if self.writer is not None:
            self.writer.close(wait)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank: int, world_size: int,
         keep_last: int, zero_stage: int = 0) -> Path:
    """One synchronous save, sealed (every rank calls it)."""
    saver = Checkpointer(engine, ckpt_dir, rank, world_size, keep_last, zero_stage)
    saver.start(step, client_state)
    return saver.finish()


def gather_objects(mine, world_size: int) -> list:
    """Every rank's ``mine``, in rank order (every rank gets the list)."""
    if world_size == 1:
        return [mine]
    import torch.distributed as td

    parts: list = [None] * world_size
    td.all_gather_object(parts, mine)
    return parts


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file())


def verify(folder: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """None when the checkpoint is intact, else what is wrong: every file's size, and the checksums
    of this rank's share (every checksum on one rank)."""
    seal_path = folder / COMPLETE
    if not seal_path.is_file():
        return "incomplete (no fpm_complete.json)"
    try:
        seal = json.loads(seal_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable fpm_complete.json"
    for rel, (size, _) in seal["files"].items():
        p = folder / rel
        if not p.is_file():
            return f"missing {rel}"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} were written"
    for rel, (_, crc) in seal["files"].items():
        if is_mine(rel, rank, world_size) and crc32_of(folder / rel) != crc:
            return f"{rel} does not match its checksum"
    return None


def _agreed_problem(folder: Path, rank: int, world_size: int) -> str | None:
    """What any rank found wrong with its share of ``folder`` (the same answer on every rank); the
    rank that found it says so on its own log."""
    problem = verify(folder, rank, world_size)
    if world_size == 1:
        return problem
    if problem is not None:
        sys.stderr.write(f"warning: rank {rank}: checkpoint {folder} is damaged ({problem})\n")
    for r, p in enumerate(gather_objects(problem, world_size)):
        if p is not None:
            return f"rank {r} found: {p}"
    return None


def find_resumable(ckpt_dir: Path, rank: int = 0, world_size: int = 1) -> tuple[Path, dict] | None:
    """The newest intact checkpoint (starting from ``latest``), skipping damaged ones with a warning.
    With ``world_size`` > 1 every rank of the job calls it and checks its share of the checksums."""
    tags = complete_tags(ckpt_dir)
    latest = ckpt_dir / LATEST
    if latest.is_file():
        pointed = latest.read_text().strip()
        if pointed not in tags and TAG_RE.match(pointed):
            warn(f"{ckpt_dir}/latest points to {pointed}, which is incomplete; looking for an older checkpoint")
    for tag in reversed(tags):
        folder = ckpt_dir / tag
        problem = _agreed_problem(folder, rank, world_size)
        if problem is None:
            return folder, json.loads((folder / COMPLETE).read_text())
        warn(f"checkpoint {folder} is damaged ({problem}); using the previous one")
    return None


def load(engine, folder: Path, seal: dict, rank: int, world_size: int, zero_stage: int,
         universal: Path | None = None) -> dict:
    """Load a checkpoint into ``engine``; returns the client state. With ``universal`` (its
    conversion, :mod:`fpm.engine.reshard`; the engine built with ``checkpoint.load_universal``),
    at another world size or ZeRO stage, each rank's RNG then seeded for the new shape."""
    saved_world = int(seal["world_size"])
    if universal is not None:
        _, client = engine.load_checkpoint(str(universal.parent), tag=universal.name, load_module_strict=True,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise FpmError(f"{universal}: DeepSpeed could not load this universal checkpoint")
        seed_new_shape(int(client.get("seed", 0)), int(client["step"]), rank)
        return client
    if saved_world != world_size and zero_stage > 0:
        raise FpmError(  # the trainer converts such a checkpoint before it gets here (fpm.engine.reshard)
            f"{folder} was written by {saved_world} data-parallel ranks, this run has {world_size}; ZeRO "
            f"stage {zero_stage} partitions the optimizer state per rank: convert it with `fpm checkpoint convert` "
            f"and rerun, which resumes it through DeepSpeed's universal format"
        )
    _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=True,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise FpmError(f"{folder}: DeepSpeed could not load this checkpoint")
    rng_file = folder / "rng" / f"rank{rank:05d}.pt"
    if rng_file.is_file() and saved_world == world_size:
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif rank == 0:
        warn(f"{folder}: no RNG state for rank {rank} (written by {saved_world} ranks); dropout masks will differ")
    return client
