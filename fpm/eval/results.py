"""What an evaluation leaves on disk, for a fine-tuned model and the floors alike: predictions,
the scores (``results.json`` for dev), and the official submission files for test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fpm.data.tasks import Split
from fpm.eval.metrics import task_metrics
from fpm.rundir import RunDir, write_json


def write_results(out: Path, recipe, split: Split, probs: np.ndarray, extra: dict,
                  label_names: dict[str, str]) -> dict | None:
    """results.json + predictions for dev; submission files (and no score) for test."""
    task = recipe.task
    labels = task.labels
    pred = probs.argmax(axis=1)
    rows = []
    for ex, p, pr in zip(split.examples, pred, probs):
        row = {"id": ex.id, "line": ex.line, "prediction": labels[int(p)], "confidence": float(pr[int(p)])}
        if ex.label is not None:
            row.update(label=labels[ex.label], correct=bool(ex.label == p))
        rows.append(row)
    with open(out / f"predictions_{split.split}.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not split.labeled:
        if task.name == "qqp":
            with open(out / "QQP.tsv", "w") as fh:
                fh.write("index\tprediction\n")
                fh.writelines(f"{r['id']}\t{r['prediction']}\n" for r in rows)
        else:
            with open(out / "tnews_predict.json", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps({"id": r["id"], "label": r["prediction"],
                                          "label_desc": label_names.get(r["prediction"], "")},
                                         ensure_ascii=False) + "\n" for r in rows)
        return None
    y = [ex.label for ex in split.examples]
    positive = labels.index(task.positive_label) if task.positive_label is not None else None
    _, m = task_metrics(task, y, pred.tolist())
    results = {"task": task.name, "split": split.split, "n_examples": m["n_examples"], "accuracy": m["accuracy"],
               "f1": m["f1"], "precision": m["precision"], "recall": m["recall"], "macro_f1": m["macro_f1"],
               "fields": list(task.fields), "metric_for_best": task.metric,
               "f1_is": f"F1 of class {task.positive_label}" if positive is not None else "macro-F1",
               "labels": labels, "per_class": {labels[i]: r for i, r in enumerate(m["per_class"])},
               "confusion": m["confusion"], "data": split.report(), **extra}
    (out / f"results_{split.split}.json").write_text(json.dumps(results, indent=1))
    if split.split == "dev":
        write_json(RunDir(out).results, results)
    return results
