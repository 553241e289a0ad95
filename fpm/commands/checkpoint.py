"""`fpm checkpoint verify`: every checksum of a run's checkpoints, in one process.

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
