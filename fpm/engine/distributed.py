"""Process-group set-up from torchrun's or SLURM's variables, and a teardown that always runs.

One process needs nothing: fpm fills RANK=0, WORLD_SIZE=1, LOCAL_RANK=0 and a free MASTER_PORT
(DeepSpeed wants them even alone). Under srun, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID give the
rank, and the first host of SLURM_JOB_NODELIST (via `scontrol show hostnames`) the master address.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

from fpm.errors import FpmError


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0].split("[")[0]


def resolve_env() -> Dist:
    """Fill the torch.distributed environment variables from whichever launcher started us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / deepspeed launcher / already set
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        if "MASTER_PORT" not in env:
            job = int(env.get("SLURM_JOB_ID", "0"))
            env["MASTER_PORT"] = str(20000 + job % 20000)
    else:
        rank, world, local, local_world = 0, 1, 0, 1
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    if not 0 <= rank < world:
        raise FpmError(f"RANK={rank} is outside WORLD_SIZE={world}")
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    env["LOCAL_WORLD_SIZE"] = str(local_world)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        raise FpmError("MASTER_PORT is not set (torchrun and srun runs need a rendezvous port)")
    backend = "nccl" if select_accelerator() == "cuda" else "gloo"
    return Dist(rank, world, local, local_world, env["MASTER_ADDR"], int(env["MASTER_PORT"]), backend)


def select_accelerator() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``; also DeepSpeed's choice (``DS_ACCELERATOR``,
    unless already set), made before anything imports DeepSpeed. Asking PyTorch, not looking for
    ``/dev/nvidia0`` or ``CUDA_VISIBLE_DEVICES``: a container may be given a GPU with neither."""
    import torch

    name = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", name)
    return name


def device_for(local_rank: int):
    """The device a process trains and evaluates on: GPU ``local_rank % device_count()`` (ranks
    beyond the node's GPU count share them round-robin), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_threads(local_world_size: int) -> int:
    """Threads per rank: SLURM's --cpus-per-task when given, else this machine's cores shared out
    among the ranks on it (ranks must not fight over cores)."""
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if per_task and per_task.isdigit() and int(per_task) > 0:
        return int(per_task)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def init(dist: Dist) -> None:
    import deepspeed
    import torch

    if dist.backend == "gloo":
        torch.set_num_threads(cpu_threads(dist.local_world_size))
    else:
        torch.cuda.set_device(device_for(dist.local_rank))
    from fpm.console import library_chatter

    with library_chatter():  # "DeepSpeed shm_comm_op built successfully" on every start
        deepspeed.init_distributed(dist_backend=dist.backend, verbose=False)


def teardown() -> None:
    """Destroy the process group (a missing teardown aborts the process now and then on CPU)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        try:
            td.destroy_process_group()
        except Exception:  # pragma: no cover - teardown must never mask the real error
            pass


def barrier() -> None:
    import torch.distributed as td

    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


def all_max(value: float, world_size: int, device) -> float:
    """The largest ``value`` over the ranks (every rank gets it)."""
    if world_size == 1:
        return value
    import torch
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64, device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return float(t.item())


def all_sum(value, world_size: int):
    """``value`` (in float64, on its device) summed over the ranks."""
    value = value.detach().clone().double()
    if world_size > 1:
        import torch.distributed as td

        td.all_reduce(value, op=td.ReduceOp.SUM)
    return value


def all_mean(value, world_size: int, device) -> float:
    """The mean of a scalar ``value`` over the ranks, in its own dtype."""
    if world_size > 1:
        import torch.distributed as td

        value = value.detach().clone().to(device)
        td.all_reduce(value, op=td.ReduceOp.SUM)
        value = value / world_size
    return float(value.item())
