"""The depth study's plots (``DIR/plots/*.png``) from its summary and cells, as :mod:`fpm.study.report`
builds them: dev metrics against depth (with the floors, the controls and the paper's Table 3),
pretraining and validation loss, cost per depth, and accuracy against pretraining compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fpm.eval.page import save_figure
from fpm.paper import TABLE3_QQP_DEV

METRICS = ("precision", "recall", "f1", "accuracy")


def plots(out: Path, cells: list[dict], summary: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    files = {}
    per = summary["per_depth"]
    depths = [d for d in summary["depths"] if d in per]
    floors = summary.get("floors") or {}
    if depths:
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
        for ax, k in zip(axes, METRICS):
            m = [100 * per[d][k]["mean"] for d in depths]
            s = [100 * per[d][k]["std"] for d in depths]
            ax.errorbar(depths, m, yerr=s, marker="o", capsize=4, label="pretrained (mean ± std over seeds)")
            ctl = [d for d in depths if per[d].get("scratch")]
            if ctl:
                ax.errorbar(ctl, [100 * per[d]["scratch"][k]["mean"] for d in ctl],
                            yerr=[100 * per[d]["scratch"][k]["std"] for d in ctl], marker="x", linestyle="--",
                            capsize=3, color="tab:gray", label="from scratch (control)")
            for c in cells:
                if c.get(k) is not None:
                    ax.plot(c["depth"], 100 * c[k], ".", color="gray", alpha=0.5)
            if summary["task"] == "qqp" and all(d in TABLE3_QQP_DEV for d in depths) and not summary["synthetic_task"]:
                ax.plot(depths, [TABLE3_QQP_DEV[d][k] for d in depths], "s--", label="paper Table 3")
            for name, f in floors.items():
                if isinstance(f, dict) and f.get(k) is not None:
                    ax.axhline(100 * f[k], linestyle=":", color="red" if "tfidf" in name else "black",
                               label=f"floor: {name}")
            ax.set_xlabel("depth (layers, paper scale)")
            ax.set_title(k)
            ax.set_xticks(depths)
        axes[0].legend(fontsize=7)
        fig.suptitle("Dev metrics by depth: pretrained models (solid) against the floors (dotted) and the same "
                     "models trained from scratch (dashed)", fontsize=9)
        files["metrics"] = save_figure(fig, pdir / "metrics_vs_depth.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, d in enumerate(depths):
        color = f"C{i % 10}"
        for key, style, label in (("pretrain_loss", "-", "train"), ("validation_loss", "o--", "validation")):
            curves = [c.get(key) for c in cells if c["depth"] == d and c.get(key)]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = [s for s, _ in curves[0][:n]]
            ax.plot(steps, np.mean([[v for _, v in c[:n]] for c in curves], axis=0), style, color=color,
                    label=f"depth {d}, {label}", markersize=3)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("loss (MLM + SOP); dashed: held-out validation part")
    ax.legend(fontsize=8)
    files["loss"] = save_figure(fig, pdir / "pretrain_loss.png")
    if depths:
        fig, ax1 = plt.subplots(figsize=(6, 4))
        wall = [per[d]["cost"]["pretrain_wall_s"] or 0 for d in depths]
        flops = [per[d]["cost"]["pretrain_flops"] or 0 for d in depths]
        ax1.bar([str(d) for d in depths], wall, color="tab:blue", alpha=0.7)
        ax1.set_ylabel("pretraining wall time (s)")
        ax2 = ax1.twinx()
        ax2.plot([str(d) for d in depths], flops, "o-", color="tab:red")
        ax2.set_ylabel("pretraining FLOPs (6N + attention)")
        ax1.set_xlabel("depth")
        files["cost"] = save_figure(fig, pdir / "cost_vs_depth.png")
    eq = summary.get("equal_compute")
    if eq and any(c.get("points") for c in cells):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, d in enumerate(depths):
            steps = sorted({p["step"] for c in cells if c["depth"] == d for p in c.get("points", [])})
            pts = [[p for c in cells if c["depth"] == d for p in c.get("points", []) if p["step"] == s] for s in steps]
            ax.errorbar([np.mean([p["flops"] for p in ps]) for ps in pts],
                        [100 * np.mean([p["accuracy"] for p in ps]) for ps in pts],
                        yerr=[100 * (np.std([p["accuracy"] for p in ps], ddof=1) if len(ps) > 1 else 0) for ps in pts],
                        marker="o", capsize=3, color=f"C{i % 10}", label=f"depth {d}")
        ax.axvline(eq["budget_flops"], linestyle=":", color="black", label="equal compute")
        ax.set_xlabel("pretraining FLOPs")
        ax.set_ylabel("dev accuracy (%), mean ± std over seeds")
        ax.legend(fontsize=8)
        files["compute"] = save_figure(fig, pdir / "accuracy_vs_compute.png")
    return files
