"""`fpm baseline TASK`: the majority and TF-IDF floors of a task (:mod:`fpm.eval.floors`), as a table."""

from __future__ import annotations

from pathlib import Path

from fpm.console import console, info
from fpm.data.tasks import load_split, tnews_label_names
from fpm.eval.floors import floors


def baseline_command(task_name: str, data_dir: Path | None, out: Path | None, overrides: list[str]) -> dict:
    from rich.table import Table

    from fpm.config import load_recipe

    task = load_recipe(task_name, overrides=overrides, kind="finetune").task
    splits = {n: load_split(task, data_dir, n, required=n != "test") for n in ("train", "dev", "test")}
    out = Path(out) if out else Path("runs") / f"baseline-{task.name}-{'+'.join(task.fields)}"
    names = tnews_label_names(Path(data_dir)) if task.name == "tnews" else {}
    summary = floors(task, splits, out, names)
    t = Table(title=f"{task.name} floors on dev ({summary['majority']['n_examples']:,} examples), input "
                    f"{' + '.join(task.fields)}")
    t.add_column("")
    f1 = "F1 of class " + task.positive_label if task.positive_label else "macro-F1"
    for col in ("accuracy", "precision", "recall", f1):
        t.add_column(col, justify="right")
    for name in ("majority", "tfidf"):
        r = summary[name]
        t.add_row(name, *(f"{100 * r[k]:.2f}" for k in ("accuracy", "precision", "recall", "f1")))
    console().print(t)
    info(f"results in {out} (floors.json, majority/results.json, tfidf/results.json)")
    return summary
