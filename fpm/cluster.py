"""SLURM batch scripts from the templates in ``slurm/``, and their submission with sbatch
(`fpm slurm render|submit`, and the sweep's jobs).

The templates are themselves working scripts (``sbatch slurm/pretrain.sbatch RECIPE ...``); rendering
rewrites their ``#SBATCH`` header for a cluster shape and bakes the command in, so that the
result can be submitted as is, kept with the run, or shown with ``--dry-run``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from fpm.errors import FpmError

KINDS = ("pretrain", "finetune", "sweep")


def slurm_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / "slurm", here.parent / "slurm"):
        if candidate.is_dir():
            return candidate
    raise FpmError("cannot find the slurm/ script templates")


def render(kind: str, args: list[str], *, nodes: int = 1, gpus_per_node: int = 0, tasks_per_node: int | None = None,
           cpus_per_task: int | None = None, partition: str | None = None, time: str | None = None,
           account: str | None = None, job_name: str | None = None, extra: list[str] | None = None) -> str:
    """The ``kind`` template with its header set to this shape and ``args`` as the fpm command's arguments."""
    if kind not in KINDS:
        raise FpmError(f"unknown script kind {kind!r} (choose from {', '.join(KINDS)})")
    if nodes < 1 or gpus_per_node < 0:
        raise FpmError("--nodes must be >= 1 and --gpus-per-node >= 0")
    text = (slurm_dir() / f"{kind}.sbatch").read_text()
    tasks = tasks_per_node if tasks_per_node is not None else max(1, gpus_per_node)
    wanted = {"nodes": str(nodes), "ntasks-per-node": str(tasks), "gpus-per-node": str(gpus_per_node)}
    if cpus_per_task:
        wanted["cpus-per-task"] = str(cpus_per_task)
    for key, value in (("partition", partition), ("time", time), ("account", account), ("job-name", job_name)):
        if value:
            wanted[key] = value
    lines = text.splitlines()
    out, seen = [], set()
    for line in lines:
        m = re.match(r"#SBATCH --([a-z-]+)=(.*)", line)
        if m and m.group(1) in wanted:
            seen.add(m.group(1))
            if m.group(1) == "gpus-per-node" and gpus_per_node == 0:
                continue  # a CPU allocation: no GPU request at all
            out.append(f"#SBATCH --{m.group(1)}={wanted[m.group(1)]}")
        else:
            out.append(line)
    header_end = max(i for i, line in enumerate(out) if line.startswith("#SBATCH"))
    more = [f"#SBATCH --{k}={v}" for k, v in wanted.items() if k not in seen and not (k == "gpus-per-node" and gpus_per_node == 0)]
    more += [f"#SBATCH {e}" for e in (extra or [])]
    command = ["", "# rendered by `fpm slurm render`: the fpm command's arguments", f"set -- {shlex.join(args)} \"$@\""]
    out = out[:header_end + 1] + more + command + out[header_end + 1:]
    return "\n".join(out) + "\n"


def sbatch(script: Path, dependency: str | None = None, env: dict | None = None) -> str:
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    cmd.append(str(script))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    except FileNotFoundError:
        raise FpmError("sbatch not found: this machine is not a SLURM submit host") from None
    if proc.returncode:
        raise FpmError(f"sbatch {script} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return proc.stdout.strip().split(";")[0]
