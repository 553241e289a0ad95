"""`fpm checkpoint verify`: every checksum of a run's checkpoints, in one process; `fpm checkpoint
convert`: a ZeRO checkpoint to DeepSpeed's universal format (:mod:`fpm.engine.reshard`).

Resuming checks every file's size and each rank's share of the checksums (fpm.engine.checkpoint);
this is the full check, for a checkpoint about to be copied, archived or exported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fpm.console import info, warn
from fpm.engine import checkpoint as ckpt
from fpm.errors import FpmError
from fpm.rundir import RunDir


def verify_command(run_dir: Path, tag: str | None = None) -> None:
    ckpt_dir = RunDir(run_dir).checkpoints
    tags = [tag] if tag else ckpt.complete_tags(ckpt_dir)
    if not tags:
        raise FpmError(f"{run_dir}: no complete checkpoint in {ckpt_dir}")
    damaged = []
    for t in tags:
        folder = ckpt_dir / t
        t0 = time.perf_counter()
        problem = ckpt.verify(folder) if folder.is_dir() else "no such checkpoint"
        if problem:
            warn(f"{folder}: {problem}")
            damaged.append(t)
            continue
        seal = json.loads((folder / ckpt.COMPLETE).read_text())
        size = sum(s for s, _ in seal["files"].values())
        info(f"{folder}: intact ({len(seal['files'])} files, {size / 1e9:.2f} GB checked in {time.perf_counter() - t0:.1f} s)")
    if damaged:
        raise FpmError(f"{run_dir}: {len(damaged)} damaged checkpoint(s): {', '.join(damaged)}; a resume skips them "
                       "and uses the newest intact one")


def convert_command(run_dir: Path, tag: str | None = None) -> Path:
    """`fpm checkpoint convert`: a run's checkpoint (the newest intact one by default) to the
    universal format, in ``RUN/checkpoints/universal/TAG``."""
    from fpm.engine.reshard import convert, universal_folder

    ckpt_dir = RunDir(run_dir).checkpoints
    if tag:
        folder = ckpt_dir / tag
        problem = ckpt.verify(folder) if folder.is_dir() else "no such checkpoint"
        if problem:
            raise FpmError(f"{folder}: {problem}")
    else:
        found = ckpt.find_resumable(ckpt_dir)
        if found is None:
            raise FpmError(f"{run_dir}: no complete checkpoint")
        folder = found[0]
    out = convert(folder, universal_folder(ckpt_dir, folder.name))
    info(f"{folder} -> {out} (DeepSpeed's universal format: resumes at any world size, ZeRO stage 1-3)")
    return out
