"""A two-process worker for tests/test_checkpoint.py: sealing and verification shared by the ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ckpt_share_worker.py save|resume DIR

Files are written as DeepSpeed writes them at ZeRO-1/2 (each rank its optimizer partition, rank 0
the model states); every checksum a rank computes is printed, so the test sees who read what.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fpm.engine import checkpoint as ckpt
from fpm.engine.distributed import init, resolve_env


class PartitionedEngine:
    def __init__(self, rank: int, value: float):
        self.rank, self.value = rank, value

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"exp_avg": torch.full((256,), self.value + self.rank)},
                   folder / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt")
        if self.rank == 0:
            torch.save({"w": torch.full((16,), self.value), "client": client_state}, folder / "mp_rank_00_model_states.pt")


def main(mode: str, run: Path) -> int:
    dist = resolve_env()
    init(dist)
    rank, world = dist.rank, dist.world_size
    crc = ckpt.crc32_of

    def logged(path):
        print(f"rank {rank} checksummed {Path(path).parent.name}/{Path(path).name}", flush=True)
        return crc(path)

    ckpt.crc32_of = logged
    if mode == "save":
        for step in (10, 20):
            ckpt.save(PartitionedEngine(rank, step), run, step, {"step": step}, rank, world, keep_last=3, zero_stage=2)
    else:
        found = ckpt.find_resumable(run, rank, world)
        print(f"rank {rank} resumes {found[0].name if found else None}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
