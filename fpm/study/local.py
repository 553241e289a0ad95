"""The local executor: the cells of a plan on this machine, each step a plain `fpm pretrain` /
`fpm finetune` process. A cell's state is its ``cell.json``; finished cells are skipped, so rerunning
continues where the sweep stopped. SIGTERM/SIGUSR1 go to the running cells, which checkpoint and
exit with 75; the sweep then stops too.

``jobs`` cells run at once, each on its own share of the machine's cores (``FPM_CPUS``, which the
training commands pin themselves to: :func:`fpm.engine.distributed.cpu_threads`). Small models use
a core far better alone than two threads share one model: on 2 cores (AVX2 EPYC) two tiny BERT
pretrainings of one thread each finished in 43 s together against 2 x 38 s one after the other
with two threads (bench/RESULTS.md). Each cell's own steps stay in order (pretraining, then its
fine-tunings); only the thread count of a cell depends on ``jobs``.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fpm.console import info, warn
from fpm.rundir import cell_state, write_cell_state
from fpm.study.plan import SweepPlan, finetune_argv, has_control, pretrain_argv


def machine_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def auto_jobs(plan: SweepPlan) -> int:
    """Cells at once by default: one per core for the tiny preset on a machine without a GPU (its
    models are small enough for every core to hold one), else one (a cell uses the whole machine)."""
    import torch

    if plan.preset != "tiny" or torch.cuda.is_available():
        return 1
    return max(1, min(len(machine_cores()), len(plan.cells)))


class _Forward:
    """SIGTERM/SIGUSR1 to the sweep go to the running cells, which checkpoint and exit with 75."""

    def __init__(self) -> None:
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.signal: int | None = None

    def __enter__(self) -> _Forward:
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        with self.lock:
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signum)

    def run(self, argv: list[str], log: Path, cpus: list[int] | None) -> tuple[int, float]:
        t0 = time.time()
        env = dict(os.environ)
        if cpus is not None:
            env["FPM_CPUS"] = ",".join(map(str, cpus))
        with open(log, "a") as fh:
            fh.write(f"\n$ fpm {' '.join(argv)}\n")
            fh.flush()
            with self.lock:
                if self.signal is not None:  # arrived between two steps: do not start another
                    return 75, 0.0
                child = subprocess.Popen([sys.executable, "-m", "fpm", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                         env=env)
                self.children.add(child)
            code = child.wait()
            with self.lock:
                self.children.discard(child)
        return code, time.time() - t0


def run_local(plan: SweepPlan, jobs: int | None = None) -> dict:
    jobs = jobs or auto_jobs(plan)
    with _Forward() as fwd:
        return _run_cells(plan, fwd, jobs)


def _run_cells(plan: SweepPlan, fwd: _Forward, jobs: int) -> dict:
    out = Path(plan.out)
    counts = {"done": 0, "failed": 0, "skipped": 0, "preempted": False}
    todo: queue.Queue = queue.Queue()
    for i, cell in enumerate(plan.cells, 1):
        if cell_state(cell.dir(out)).get("status") == "done":
            counts["skipped"] += 1
        else:
            todo.put((i, cell))
    cores = machine_cores()
    share = max(1, len(cores) // jobs)
    lock = threading.Lock()

    def worker(k: int) -> None:
        cpus = cores[k * share:(k + 1) * share] if jobs > 1 else None
        while fwd.signal is None:
            try:
                i, cell = todo.get_nowait()
            except queue.Empty:
                return
            outcome = _run_cell(plan, out, i, cell, fwd, cpus)
            with lock:
                if outcome == "preempted":
                    counts["preempted"] = True
                else:
                    counts[outcome] += 1
            if outcome == "preempted":
                return

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():  # joined in slices: the main thread must stay free to take signals
            t.join(0.5)
    if fwd.signal is not None:
        counts["preempted"] = True
    return counts


def wait_for_downstream(run: Path, steps: list[int], fwd: _Forward, timeout_s: float = 6 * 3600) -> dict:
    """Wait for the fine-tunings of ``steps`` that the pretraining in ``run`` started (their
    ``result.json``); what each says, or ``pending`` when the sweep is stopped or they take longer
    than ``timeout_s`` (the report lists them as missing)."""
    from fpm.eval.downstream import folder
    from fpm.rundir import read_json

    t0 = time.time()
    while fwd.signal is None and time.time() - t0 < timeout_s:
        found = {s: read_json(folder(run, s) / "result.json") for s in steps}
        if all(found.values()):
            return {str(s): ("failed: " + r["error"]) if "error" in r else "done" for s, r in found.items()}
        time.sleep(1.0)
    return {str(s): "pending" for s in steps}


def _run_cell(plan: SweepPlan, out: Path, i: int, cell, fwd: _Forward, cpus: list[int] | None) -> str:
    """One cell's steps in order; ``done``, ``failed`` or ``preempted``."""
    from fpm.engine.signals import EXIT_PREEMPTED

    cdir = cell.dir(out)
    cdir.mkdir(parents=True, exist_ok=True)
    where = f" on cores {','.join(map(str, cpus))}" if cpus is not None else ""
    info(f"[{i}/{len(plan.cells)}] depth {cell.depth} ({cell.layers} layers), seed {cell.seed}{where}")
    state = {"status": "running", "depth": cell.depth, "layers": cell.layers, "seed": cell.seed,
             "started": time.time(), "cpus": cpus}
    write_cell_state(cdir, state)
    log = cdir / "cell.log"
    code, wall = fwd.run(pretrain_argv(plan, cell), log, cpus)
    state["pretrain"] = {"exit_code": code, "wall_s": wall}
    if code == 0 and fwd.signal is None:
        code, wall = fwd.run(finetune_argv(plan, cell), log, cpus)
        state["finetune"] = {"exit_code": code, "wall_s": wall}
    if code == 0 and fwd.signal is None and has_control(plan, cell):
        code, wall = fwd.run(finetune_argv(plan, cell, scratch=True), log, cpus)
        state["finetune_scratch"] = {"exit_code": code, "wall_s": wall}
    if code == 0 and fwd.signal is None and cell.compute_steps:  # started by the pretraining, beside it
        state["equal_compute"] = wait_for_downstream(cdir / "pretrain", cell.compute_steps, fwd)
    if code == EXIT_PREEMPTED or fwd.signal is not None:
        state["status"] = "preempted"
        write_cell_state(cdir, state)
        info(f"pre-empted during {cell.name}: its checkpoint is saved; rerun the sweep to continue")
        return "preempted"
    state["status"] = "done" if code == 0 else "failed"
    write_cell_state(cdir, state)
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        warn(f"cell {cell.name} failed (exit {code}); the sweep goes on. Last lines of {log}: " + " | ".join(tail))
        return "failed"
    return "done"
