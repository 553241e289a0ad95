"""Checkpoints that resume exactly and never leave a broken ``latest``.

Layout under ``RUN/checkpoints/``::

    step-00000100/            DeepSpeed's files (model, optimizer/ZeRO partitions, scheduler, client state)
        rng/rank00000.pt      every RNG of every rank (python, numpy, torch CPU, CUDA)
        fpm_complete.json     written last: step, world size, size and CRC32 of every file
    latest                    the tag of the newest complete checkpoint, replaced atomically

A checkpoint counts only once ``fpm_complete.json`` exists, and ``latest`` moves only after that.
On resume the files are checked against it; a checkpoint that fails the check is skipped with a
warning and the previous one is used.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from fpm.console import warn
from fpm.errors import FpmError
from fpm.files import crc32_of

COMPLETE = "fpm_complete.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _inventory(folder: Path) -> dict[str, list[int]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            out[str(p.relative_to(folder))] = [p.stat().st_size, crc32_of(p)]
    return out


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


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank: int, world_size: int,
         keep_last: int, zero_stage: int = 0) -> Path:
    """Save on every rank; rank 0 then seals it, moves ``latest`` and prunes old checkpoints."""
    from fpm.engine.distributed import barrier

    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0 and folder.exists():  # a leftover of an interrupted save of this same step
        shutil.rmtree(folder)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    (folder / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / "rng" / f"rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        seal = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "files": _inventory(folder)}
        tmp = folder / (COMPLETE + ".tmp")
        tmp.write_text(json.dumps(seal))
        os.replace(tmp, folder / COMPLETE)
        latest_tmp = ckpt_dir / (LATEST + ".tmp")
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, ckpt_dir / LATEST)
        for old in sorted(complete_tags(ckpt_dir))[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(ckpt_dir / "universal" / old, ignore_errors=True)  # its conversion (fpm.engine.reshard)
    barrier()
    return folder


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file())


def verify(folder: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong."""
    seal_path = folder / COMPLETE
    if not seal_path.is_file():
        return "incomplete (no fpm_complete.json)"
    try:
        seal = json.loads(seal_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable fpm_complete.json"
    for rel, (size, crc) in seal["files"].items():
        p = folder / rel
        if not p.is_file():
            return f"missing {rel}"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} were written"
        if crc32_of(p) != crc:
            return f"{rel} does not match its checksum"
    return None


def find_resumable(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest intact checkpoint (starting from ``latest``), skipping damaged ones with a warning."""
    tags = complete_tags(ckpt_dir)
    latest = ckpt_dir / LATEST
    if latest.is_file():
        pointed = latest.read_text().strip()
        if pointed not in tags and TAG_RE.match(pointed):
            warn(f"{ckpt_dir}/latest points to {pointed}, which is incomplete; looking for an older checkpoint")
    for tag in reversed(tags):
        folder = ckpt_dir / tag
        problem = verify(folder)
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
