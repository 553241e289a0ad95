"""`fpm report DIR`: a sweep's report rebuilt from its cell files (:mod:`fpm.study.report`), or one
pretraining run's report from its metrics (:mod:`fpm.eval.run_report`)."""

from __future__ import annotations

from pathlib import Path

from fpm.console import info
from fpm.errors import FpmError
from fpm.eval.run_report import build_run_report
from fpm.rundir import SWEEP_PLAN, RunDir
from fpm.study.report import build_report


def report_command(folder: Path) -> dict:
    folder = Path(folder)
    if (folder / SWEEP_PLAN).is_file():
        paths = build_report(folder)
    elif RunDir(folder).recipe.is_file() and RunDir(folder).metrics.is_file():
        paths = build_run_report(folder)
    else:
        raise FpmError(f"{folder}: neither a sweep directory ({SWEEP_PLAN}) nor a pretraining run directory "
                       "(recipe.yaml and metrics.jsonl)")
    info(f"report: {paths['md']} and {paths['html']}")
    return paths
