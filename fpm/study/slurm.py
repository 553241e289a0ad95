"""The SLURM executor: one pretraining job per cell and a fine-tuning job that starts only if it
succeeded (and, for each depth's first seed with controls on, the from-scratch fine-tuning after it
too), rendered from fpm's scripts in ``slurm/``; a cell's equal-compute checkpoint is fine-tuned by
a job its pretraining submits once that checkpoint is sealed (:mod:`fpm.eval.downstream`). Cells
already finished are skipped."""

from __future__ import annotations

from pathlib import Path

from fpm.console import info
from fpm.rundir import RunDir, write_cell_state
from fpm.cluster import render, sbatch
from fpm.study.plan import finetune_argv, has_control, pretrain_argv


def sweep_scripts(plan, options: dict) -> list[tuple[str, ...]]:
    shape = {k: options[k] for k in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "partition", "time",
                                     "account") if options.get(k) is not None}
    ft_shape = {k: v for k, v in shape.items() if k in ("partition", "time", "account", "cpus_per_task")}
    ft_shape["gpus_per_node"] = 1 if shape.get("gpus_per_node") else 0
    out = []
    for cell in plan.cells:
        pre = pretrain_argv(plan, cell, launcher="slurm")[1:]  # equal-compute fine-tunings: jobs of their own
        fin = finetune_argv(plan, cell)[1:]
        scripts = (render("pretrain", pre, job_name=f"fpm-{cell.name}-pre", **shape),
                   render("finetune", fin, job_name=f"fpm-{cell.name}-ft", **ft_shape))
        if has_control(plan, cell):
            scratch = finetune_argv(plan, cell, scratch=True)[1:]
            scripts += (render("finetune", scratch, job_name=f"fpm-{cell.name}-ft0", **ft_shape),)
        out.append(scripts)
    return out


def submit_sweep(plan, options: dict) -> list[tuple[str, ...]]:
    """One pretraining job per cell and a fine-tuning job that starts only if it succeeded.
    Cells already finished are skipped, so resubmitting a sweep only submits what is left."""
    out = Path(plan.out)
    jobs = []
    for cell, (pre, fin, *control) in zip(plan.cells, sweep_scripts(plan, options)):
        cdir = cell.dir(out)
        if RunDir(cdir / "finetune").results.is_file():
            continue
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "pretrain.sbatch").write_text(pre)
        (cdir / "finetune.sbatch").write_text(fin)
        pre_job = sbatch(cdir / "pretrain.sbatch")
        fin_job = sbatch(cdir / "finetune.sbatch", dependency=f"afterok:{pre_job}")
        ids = [pre_job, fin_job]
        if control:
            (cdir / "finetune-scratch.sbatch").write_text(control[0])
            ids.append(sbatch(cdir / "finetune-scratch.sbatch", dependency=f"afterok:{pre_job}"))
        write_cell_state(cdir, {"status": "submitted", "depth": cell.depth, "layers": cell.layers, "seed": cell.seed,
                                "jobs": ids})
        info(f"{cell.name}: pretraining job {pre_job}, fine-tuning job {fin_job}"
             + (f" and its from-scratch control {ids[2]}" if control else "") + f" (after {pre_job})")
        jobs.append(tuple(ids))
    return jobs
