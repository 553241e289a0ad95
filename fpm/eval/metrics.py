"""Classification metrics, computed from the confusion matrix (no hidden averaging choices).

* binary tasks (QQP): accuracy, and precision, recall and F1 *of the positive class*
  (GLUE's QQP F1 is the duplicate class's);
* multi-class tasks (TNEWS): accuracy, macro-averaged precision/recall/F1 (every class weighs the
  same; a class never predicted has precision 0), per-class figures and the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """``m[i, j]`` = examples of true class i predicted as j."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def _safe(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def per_class(m: np.ndarray) -> list[dict]:
    rows = []
    for c in range(len(m)):
        tp = m[c, c]
        p = _safe(tp, m[:, c].sum())
        r = _safe(tp, m[c, :].sum())
        rows.append({"precision": p, "recall": r, "f1": _safe(2 * p * r, p + r), "support": int(m[c, :].sum()),
                     "predicted": int(m[:, c].sum())})
    return rows


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int,
                           positive: int | None = None) -> dict:
    """Metrics in percent-free fractions. With ``positive`` set, precision/recall/f1 are that class's;
    otherwise they are macro averages."""
    m = confusion(y_true, y_pred, n_classes)
    n = int(m.sum())
    rows = per_class(m)
    out = {"n_examples": n, "accuracy": _safe(np.trace(m), n)}
    macro = {k: float(np.mean([r[k] for r in rows])) for k in ("precision", "recall", "f1")}
    if positive is not None:
        out.update({k: rows[positive][k] for k in ("precision", "recall", "f1")})
    else:
        out.update(macro)
    out["macro_f1"] = macro["f1"]
    out["per_class"] = rows
    out["confusion"] = m.tolist()
    return out


def task_metrics(task, y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[float, dict]:
    """The metrics of predictions on ``task`` (precision/recall/F1 of ``task.positive_label`` for a
    binary task, macro-averaged otherwise), and the value of ``task.metric``: the one that picks
    the best checkpoint."""
    positive = task.labels.index(task.positive_label) if task.positive_label is not None else None
    m = classification_metrics(y_true, y_pred, task.num_labels, positive)
    return m[task.metric], m
