"""Statistics for the depth study: how sure are we that one depth is best?

Input: per-example correctness ``c[d, s, i]`` (depth d, seed s, dev example i) — all depths are
scored on the *same* dev examples, so comparisons are paired.

* :func:`bootstrap_best` resamples seeds (within each depth) and dev examples (shared by all
  depths) together; for each resample it records every depth's accuracy and which depth wins.
  Reported: a percentile CI per depth, P(depth is best), and the CI of the best depth's margin
  over each other depth — the margin CI excluding 0 is what "clearly better" means.
* :func:`paired_permutation` tests two depths on the same examples: per example, the seed-averaged
  difference in correctness; the null flips the sign of each example's difference at random.
"""

from __future__ import annotations

import numpy as np


def bootstrap_best(correct: np.ndarray, depths: list[int], n_boot: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> dict:
    """``correct``: array (n_depths, n_seeds, n_examples) of 0/1."""
    c = np.asarray(correct, dtype=np.float64)
    n_d, n_s, n_x = c.shape
    rng = np.random.default_rng(seed)
    acc = np.empty((n_boot, n_d))
    for b in range(n_boot):
        ex = rng.integers(0, n_x, n_x)
        seeds = rng.integers(0, n_s, (n_d, n_s))
        per_seed = c[:, :, ex].mean(axis=2)  # (n_d, n_s)
        acc[b] = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    alpha = (1 - confidence) / 2
    point = c.mean(axis=(1, 2))
    best = int(np.argmax(point))
    tied = [depths[d] for d in range(n_d) if abs(point[d] - point[best]) < 1e-12]
    top = acc >= acc.max(axis=1, keepdims=True) - 1e-12  # ties share the win
    wins = (top / top.sum(axis=1, keepdims=True)).mean(axis=0)
    margins = {}
    for d in range(n_d):
        if d == best:
            continue
        diff = acc[:, best] - acc[:, d]
        lo, hi = np.quantile(diff, [alpha, 1 - alpha])
        margins[depths[d]] = {"diff": float(point[best] - point[d]), "lo": float(lo), "hi": float(hi),
                              "excludes_zero": bool(lo > 0)}
    ci = np.quantile(acc, [alpha, 1 - alpha], axis=0)
    return {
        "metric": "accuracy",
        "confidence": confidence,
        "n_boot": n_boot,
        "best_depth": depths[best],
        "per_depth": {depths[d]: {"accuracy": float(point[d]), "lo": float(ci[0, d]), "hi": float(ci[1, d]),
                                  "p_best": float(wins[d])} for d in range(n_d)},
        "margins": margins,
        "clearly_best": bool(margins) and all(m["excludes_zero"] for m in margins.values()),
        "tied_with": [d for d in tied if d != depths[best]],
    }


def paired_permutation(a: np.ndarray, b: np.ndarray, n_perm: int = 10000, seed: int = 0) -> dict:
    """Two-sided paired permutation test on the same examples.

    ``a``, ``b``: (n_seeds, n_examples) correctness of two depths. Returns the observed accuracy
    difference (a − b) and its p-value.
    """
    da = np.asarray(a, dtype=np.float64).mean(axis=0)
    db = np.asarray(b, dtype=np.float64).mean(axis=0)
    d = da - db
    observed = float(d.mean())
    nz = d[d != 0]
    if len(nz) == 0:
        return {"diff": 0.0, "p_value": 1.0, "n_discordant": 0}
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, len(nz)))
    null = (signs * nz).sum(axis=1) / len(d)
    p = float((np.sum(np.abs(null) >= abs(observed) - 1e-12) + 1) / (n_perm + 1))
    return {"diff": observed, "p_value": p, "n_discordant": int(len(nz))}


def neighbour_tests(correct: np.ndarray, depths: list[int], alpha: float = 0.05, n_perm: int = 10000) -> list[dict]:
    """Paired permutation tests between consecutive depths (sorted)."""
    order = np.argsort(depths)
    out = []
    for i, j in zip(order[:-1], order[1:]):
        res = paired_permutation(correct[j], correct[i], n_perm=n_perm)
        out.append({"deeper": depths[j], "shallower": depths[i], **res, "significant": res["p_value"] < alpha})
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def at_budget(points: dict[int, list[list[dict]]], budget: float) -> dict[int, list[dict]]:
    """The depth study at equal compute: for every depth, each seed's fine-tuned checkpoint with the
    most pretraining FLOPs not above ``budget`` (``points[depth][seed]``: dicts with ``flops`` and
    ``step``, in any order). Depths where some seed has no such checkpoint are left out."""
    out = {}
    for d, seeds in points.items():
        chosen = [max((p for p in pts if p["flops"] <= budget * (1 + 1e-9)), key=lambda p: p["flops"], default=None)
                  for pts in seeds]
        if chosen and all(c is not None for c in chosen):
            out[d] = chosen
    return out
