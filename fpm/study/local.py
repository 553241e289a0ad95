"""The local executor: the cells of a plan one after another on this machine, each step a plain
`fpm pretrain` / `fpm finetune` process. A cell's state is its ``cell.json``; finished cells are
skipped, so rerunning continues where the sweep stopped. SIGTERM/SIGUSR1 go to the running cell,
which checkpoints and exits with 75; the sweep then stops too."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from fpm.console import info, warn
from fpm.rundir import cell_state, write_cell_state
from fpm.study.plan import SweepPlan, finetune_argv, has_control, pretrain_argv


class _Forward:
    """SIGTERM/SIGUSR1 to the sweep go to the running cell, which checkpoints and exits with 75."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.signal: int | None = None

    def __enter__(self) -> _Forward:
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def _run(argv: list[str], log: Path, fwd: _Forward) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n$ fpm {' '.join(argv)}\n")
        fh.flush()
        fwd.child = subprocess.Popen([sys.executable, "-m", "fpm", *argv], stdout=fh, stderr=subprocess.STDOUT)
        code = fwd.child.wait()
        fwd.child = None
    return code, time.time() - t0


def run_local(plan: SweepPlan) -> dict:
    with _Forward() as fwd:
        return _run_cells(plan, fwd)


def _run_cells(plan: SweepPlan, fwd: _Forward) -> dict:
    from fpm.engine.signals import EXIT_PREEMPTED

    out = Path(plan.out)
    done = failed = skipped = 0
    for i, cell in enumerate(plan.cells, 1):
        if fwd.signal is not None:
            return {"done": done, "failed": failed, "skipped": skipped, "preempted": True}
        cdir = cell.dir(out)
        state = cell_state(cdir)
        if state.get("status") == "done":
            skipped += 1
            continue
        cdir.mkdir(parents=True, exist_ok=True)
        info(f"[{i}/{len(plan.cells)}] depth {cell.depth} ({cell.layers} layers), seed {cell.seed}")
        state = {"status": "running", "depth": cell.depth, "layers": cell.layers, "seed": cell.seed,
                 "started": time.time()}
        write_cell_state(cdir, state)
        code, wall = _run(pretrain_argv(plan, cell), cdir / "cell.log", fwd)
        state["pretrain"] = {"exit_code": code, "wall_s": wall}
        if code == 0 and fwd.signal is None:
            code, wall = _run(finetune_argv(plan, cell), cdir / "cell.log", fwd)
            state["finetune"] = {"exit_code": code, "wall_s": wall}
        if code == 0 and fwd.signal is None and has_control(plan, cell):
            code, wall = _run(finetune_argv(plan, cell, scratch=True), cdir / "cell.log", fwd)
            state["finetune_scratch"] = {"exit_code": code, "wall_s": wall}
        if code == EXIT_PREEMPTED or fwd.signal is not None:
            state["status"] = "preempted"
            write_cell_state(cdir, state)
            info(f"pre-empted during {cell.name}: its checkpoint is saved; rerun the sweep to continue")
            return {"done": done, "failed": failed, "skipped": skipped, "preempted": True}
        state["status"] = "done" if code == 0 else "failed"
        write_cell_state(cdir, state)
        if code:
            failed += 1
            tail = (cdir / "cell.log").read_text(errors="replace").strip().splitlines()[-3:]
            warn(f"cell {cell.name} failed (exit {code}); the sweep goes on. Last lines of {cdir / 'cell.log'}: "
                 + " | ".join(tail))
        else:
            done += 1
    return {"done": done, "failed": failed, "skipped": skipped, "preempted": False}
