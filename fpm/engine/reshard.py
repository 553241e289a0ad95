"""Resuming a checkpoint on another cluster shape: DeepSpeed's universal checkpoints.

A ZeRO-1/2/3 checkpoint holds the optimizer state in one partition per data-parallel rank, so it
loads only on the world size and stage that wrote it. DeepSpeed's universal format holds every
parameter's fp32 weight and Adam moments whole (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``)
and loads at any world size and ZeRO stage 1-3 (``checkpoint.load_universal``). fpm converts a
checkpoint the first time a run resumes it on another shape (or on ``fpm checkpoint convert``):
``RUN/checkpoints/universal/step-N/`` holds the converted states beside a copy of the checkpoint's
model-states file (DeepSpeed reads the client state — step, data position, the spike guard — from
it). The data position carries over exactly: the stream is a function of the global step and the
global batch is the recipe's, whatever the world size. Dropout's RNG streams cannot carry over
(one per rank of the old shape); the new ranks are seeded from (seed, step, rank).

Not covered: ZeRO-0 checkpoints (no partitions to convert: they load at any world size at
ZeRO-0 as they are; to another stage they would lose the optimizer state, which fpm refuses), and
loading a universal checkpoint at ZeRO-0 (DeepSpeed cannot).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fpm.errors import FpmError

UNIVERSAL = "universal"


def saved_stage(folder: Path, seal: dict) -> int:
    """The ZeRO stage a checkpoint was written at (its seal; else read from its file names)."""
    if "zero_stage" in seal:
        return int(seal["zero_stage"])
    names = [p.name for p in folder.iterdir()]
    if any(n.startswith("zero_pp_rank_") and "_model_states" in n for n in names):
        return 3
    return 2 if any(n.startswith("zero_pp_rank_") for n in names) else 0


def needs_reshard(folder: Path, seal: dict, world_size: int, stage: int) -> bool:
    """Whether ``folder`` must go through the universal format to resume at (world_size, stage)."""
    old_stage, old_world = saved_stage(folder, seal), int(seal["world_size"])
    if old_stage == 0 and stage == 0:
        return False  # whole optimizer state: loads at any world size
    if old_stage == stage and old_world == world_size:
        return False
    if old_stage == 0 or stage == 0:
        raise FpmError(f"{folder}: written at ZeRO stage {old_stage} by {old_world} rank(s); resuming at ZeRO stage "
                       f"{stage} on {world_size} needs DeepSpeed's universal checkpoint, which has no ZeRO-0 side: "
                       f"resume at ZeRO stage {old_stage or 'ZeRO 1-3'} instead")
    return True


def universal_folder(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / UNIVERSAL / tag


def universal_for(folder: Path, seal: dict, ckpt_dir: Path, stage: int, rank: int, world_size: int,
                  quiet: bool = False) -> Path | None:
    """Where a checkpoint written by another number of ranks or ZeRO stage is loaded from: its
    conversion to DeepSpeed's universal format (made by rank 0, minutes at the paper's size: the
    other ranks wait on the store, not in a barrier); None when it loads as it is."""
    from fpm.console import info
    from fpm.engine.timeouts import while_rank0

    if not needs_reshard(folder, seal, world_size, stage):
        return None
    universal = universal_folder(ckpt_dir, folder.name)
    if rank == 0 and not quiet:
        info(f"{folder} was written by {seal['world_size']} rank(s) at ZeRO stage {saved_stage(folder, seal)}; "
             f"converting it to DeepSpeed's universal format in {universal}")
    while_rank0(lambda: convert(folder, universal), f"converting {folder}", rank, world_size)
    return universal


def default_workers() -> int:
    """Worker processes for a conversion: the cores this process may use (the other ranks wait on
    the store meanwhile), at most 8 (each holds slices of the optimizer state in memory)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def convert(folder: Path, out: Path, workers: int | None = None) -> Path:
    """Convert the checkpoint ``folder`` to DeepSpeed's universal format in ``out`` (once), with
    ``workers`` extract and merge processes (default :func:`default_workers`; DeepSpeed's own is 4/1).

    The conversion runs in a process of its own: DeepSpeed's workers are forked, and a fork of a
    process whose PyTorch thread pools have run (a training process, or an earlier conversion)
    can deadlock in the child (seen: a worker waiting forever on a futex in ``Tensor.clone``)."""
    if (out / "zero").is_dir() and any(out.glob("mp_rank_*_model_states.pt")):
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "fpm.engine.reshard", str(folder), str(tmp),
                           str(workers or default_workers())], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
        raise FpmError(f"{folder}: DeepSpeed could not convert it to a universal checkpoint ({last[0][:300]})")
    for model_states in folder.glob("mp_rank_*_model_states.pt"):
        shutil.copy2(model_states, tmp / model_states.name)
    shutil.rmtree(tmp / "tmp", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _convert_here(folder: str, out: str, workers: int) -> None:
    """The conversion itself (``python -m fpm.engine.reshard FOLDER OUT WORKERS``)."""
    from deepspeed.checkpoint import ds_to_universal

    from fpm.console import library_chatter

    with library_chatter():
        ds_to_universal.main(_Args(input_folder=folder, output_folder=out, workers=workers))


class _Args:
    """ds_to_universal's command-line arguments."""

    def __init__(self, input_folder: str, output_folder: str, workers: int):
        self.input_folder, self.output_folder = input_folder, output_folder
        self.num_extract_workers = self.num_merge_workers = workers
        self.keep_temp_folder, self.strict, self.inject_missing_state = False, True, True


if __name__ == "__main__":
    _convert_here(sys.argv[1], sys.argv[2], int(sys.argv[3]))
