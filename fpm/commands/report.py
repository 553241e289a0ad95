"""`fpm report SWEEP_DIR`: rebuild a sweep's report from its cell files (:mod:`fpm.study.report`)."""

from __future__ import annotations

from pathlib import Path

from fpm.console import info
from fpm.study.report import build_report


def report_command(sweep_dir: Path) -> dict:
    paths = build_report(sweep_dir)
    info(f"report: {paths['md']} and {paths['html']}")
    return paths
