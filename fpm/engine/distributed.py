"""Process-group set-up from torchrun's or SLURM's variables, and a teardown that always runs.

One process needs nothing: fpm fills RANK=0, WORLD_SIZE=1, LOCAL_RANK=0 and a free MASTER_PORT
(DeepSpeed wants them even alone). Under srun, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID give the
rank, and the first host of SLURM_JOB_NODELIST (via `scontrol show hostnames`) the master address.

The GPU is chosen once, by :func:`gpu_index`: GPU ``local_rank`` when the process sees at least as
many GPUs as there are ranks on its node, GPU 0 when it sees one (``srun --gpus-per-task=1``, or a
site's binding through CUDA_VISIBLE_DEVICES), and otherwise a one-line error (two ranks cannot
share a GPU under NCCL). On a GPU, LOCAL_RANK is then rewritten to that index before DeepSpeed
starts, because DeepSpeed takes its device from LOCAL_RANK (the process group's ``device_id``, the
engine's device, ``zero.Init``); :attr:`Dist.local_rank` keeps the rank on the node.
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
    device_index: int | None = None  # the GPU this process uses (LOCAL_RANK on a GPU); None on the CPU


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
    backend, index = "gloo", None
    if select_accelerator() == "cuda":
        import torch

        backend, index = "nccl", gpu_index(local, local_world, torch.cuda.device_count())
        env["LOCAL_RANK"] = str(index)  # DeepSpeed's device is cuda:LOCAL_RANK: the same GPU as fpm's
    return Dist(rank, world, local, local_world, env["MASTER_ADDR"], int(env["MASTER_PORT"]), backend, index)


def gpu_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """The GPU (an index among the ``visible`` ones) of the rank ``local_rank`` of ``local_world_size``
    on its node: ``local_rank`` when every rank can have its own (whole-node visibility), 0 when the
    process sees a single GPU (one bound per task); else an :class:`FpmError`, in one line."""
    if visible < 1:
        raise FpmError("no GPU is visible to this process (CUDA_VISIBLE_DEVICES, or the job's --gpus options)")
    local_world_size = max(local_world_size, local_rank + 1)
    if visible == 1:
        return 0
    if local_world_size <= visible:
        return local_rank
    raise FpmError(f"{local_world_size} ranks on this node but {visible} GPUs visible to each "
                   f"(local rank {local_rank}): two ranks cannot share a GPU; start one rank per GPU "
                   f"(srun --ntasks-per-node={visible}, torchrun --nproc-per-node={visible}) or give each rank "
                   f"its own GPU (srun --gpus-per-task=1, or --gpus-per-node={local_world_size})")


def select_accelerator() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``; also DeepSpeed's choice (``DS_ACCELERATOR``,
    unless already set), made before anything imports DeepSpeed. Asking PyTorch, not looking for
    ``/dev/nvidia0`` or ``CUDA_VISIBLE_DEVICES``: a container may be given a GPU with neither."""
    import torch

    name = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", name)
    return name


def device_for(local_rank: int, local_world_size: int | None = None):
    """The device a process trains and evaluates on: GPU :func:`gpu_index` (``local_world_size``
    defaults to ``local_rank + 1``), else the CPU. The same GPU for the node-local rank and for the
    index :func:`resolve_env` wrote into LOCAL_RANK."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index(local_rank, local_world_size or local_rank + 1,
                                              torch.cuda.device_count()))
    return torch.device("cpu")


def cpu_threads(local_world_size: int) -> int:
    """Threads per rank: ``FPM_THREADS`` when set (e.g. by a test runner that runs several processes
    at once), else SLURM's --cpus-per-task when given, else this machine's cores shared out among
    the ranks on it (ranks must not fight over cores). ``FPM_CPUS`` (a comma-separated list, set by
    a sweep running several cells at once: :mod:`fpm.study.local`) first pins the process to those
    cores."""
    pinned = os.environ.get("FPM_CPUS")
    if pinned:
        try:
            os.sched_setaffinity(0, {int(c) for c in pinned.split(",")})
        except (AttributeError, OSError, ValueError):  # not Linux, or cores this machine lacks: unpinned
            pass
    for given in (os.environ.get("FPM_THREADS"), os.environ.get("SLURM_CPUS_PER_TASK")):
        if given and given.isdigit() and int(given) > 0:
            return int(given)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def init(dist: Dist, timeout_s: float | None = None) -> None:
    """The process group, with ``timeout_s`` (``train.collective_timeout_s``; default
    :data:`fpm.engine.timeouts.COLLECTIVE_TIMEOUT_S`) for every collective: NCCL's watchdog and gloo
    abort a collective that waits longer (see :mod:`fpm.engine.timeouts` for the order)."""
    import deepspeed
    import torch

    from fpm.engine.timeouts import COLLECTIVE_TIMEOUT_S, as_timedelta

    if dist.backend == "gloo":
        torch.set_num_threads(cpu_threads(dist.local_world_size))
    else:
        index = dist.device_index
        torch.cuda.set_device(index if index is not None else device_for(dist.local_rank, dist.local_world_size))
    from fpm.console import library_chatter

    with library_chatter():  # "DeepSpeed shm_comm_op built successfully" on every start
        if dist.backend == "gloo":
            from fpm.cpu.build import load_shm_comm

            try:
                load_shm_comm()  # its JIT build, guarded against a lock left by a killed build
            except Exception:  # DeepSpeed builds (or does without) it itself, as before
                pass
        deepspeed.init_distributed(dist_backend=dist.backend, verbose=False,
                                   timeout=as_timedelta(timeout_s or COLLECTIVE_TIMEOUT_S))


def teardown() -> None:
    """Destroy the process group (a missing teardown aborts the process now and then on CPU)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        try:
            td.destroy_process_group()
        except Exception:  # pragma: no cover - teardown must never mask the real error
            pass
    _forget_deepspeed_groups()


# DeepSpeed keeps the groups it made (the world's clone, ZeRO's, the data-parallel one) in module
# globals; once the process group is destroyed they name groups that no longer exist, and the next
# engine built in this process (a notebook, a driver training run after run, the test suite's
# in-process runs) fails on them ("Group ... is not registered")
_DEEPSPEED_GROUP_DICTS = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                          "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP")
_DEEPSPEED_GROUPS = ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "mesh_device", "_TENSOR_MODEL_PARALLEL_GROUP",
                     "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP")


def _forget_deepspeed_groups() -> None:
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in _DEEPSPEED_GROUP_DICTS:
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
    for name in _DEEPSPEED_GROUPS:
        if hasattr(groups, name):
            setattr(groups, name, None)


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
