"""`fpm report RUN_DIR`: one pretraining run on one page — ``report.md`` and ``report.html`` (plots
embedded) in the run directory, from its ``metrics.jsonl`` and ``run.json``.

What it shows: the training loss and the validation loss against steps (rollbacks and restarts
marked), the downstream scores (:mod:`fpm.eval.downstream`) against steps and tokens, throughput and
MFU over the run's training time, the loss-spike guard's skipped steps and rollbacks, and the
restarts. Tokens are samples × ``data.seq_len`` (the positions trained on, padding included: what
a compute budget counts).
"""

from __future__ import annotations

from pathlib import Path
from statistics import median

from fpm.config import load_resolved
from fpm.engine.metrics import read_metrics
from fpm.errors import FpmError
from fpm.eval.page import save_figure, to_html
from fpm.rundir import RunDir


def collect(run_dir: Path) -> dict:
    """The run's rows by kind, with the tokens of each step."""
    rd = RunDir(run_dir)
    if not rd.recipe.is_file() or not rd.metrics.is_file():
        raise FpmError(f"{run_dir}: not a pretraining run directory with metrics (recipe.yaml and metrics.jsonl)")
    recipe = load_resolved(rd.recipe)
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r and "split" not in r]
    seq = recipe.data.seq_len
    samples = {r["step"]: r["samples"] for r in train if "samples" in r}
    batch = recipe.train.global_batch

    def tokens(step: int) -> int:  # a step not logged: the global batch since the start (no skipped data)
        return samples.get(step, step * batch) * seq

    down = [{**r, "tokens": tokens(r["step"])} for r in rows if r.get("split") == "downstream"]
    return {"recipe": recipe, "status": rd.status(), "train": train,
            "validation": [r for r in rows if r.get("split") == "validation"],
            "downstream": sorted(down, key=lambda r: r["step"]),
            "rollbacks": [r for r in rows if r.get("event") == "rollback"],
            "restarts": [r for r in rows if r.get("event") == "resumed"], "seq_len": seq}


def plots(out: Path, run: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    files = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in run["train"]], [r["loss"] for r in run["train"]], label="training loss")
    if run["validation"]:
        ax.plot([r["step"] for r in run["validation"]], [r["val_loss"] for r in run["validation"]], "o--",
                label="validation loss")
    for r in run["rollbacks"]:
        ax.axvline(r["step"], color="red", linestyle=":", label="rollback (loss spikes)")
    for r in run["restarts"]:
        ax.axvline(r["step"], color="gray", linestyle="--", label="restart")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    _legend(ax)
    files["loss"] = save_figure(fig, pdir / "loss.png")
    scored = [r for r in run["downstream"] if "value" in r]
    if scored:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        metric, harness = scored[0]["metric"], scored[0]["task"] == "harness"
        scale = 1 if harness else 100
        for ax, key, label in ((axes[0], "step", "pretraining step"), (axes[1], "tokens", "pretraining tokens")):
            ax.plot([r[key] for r in scored], [scale * r["value"] for r in scored], "o-")
            ax.set_xlabel(label)
            ax.set_ylabel(metric if harness else f"{scored[0]['task']} dev {metric} (%)")
        fig.suptitle("Downstream: each checkpoint fine-tuned and scored on the task's dev set", fontsize=9)
        files["downstream"] = save_figure(fig, pdir / "downstream.png")
    timed = [r for r in run["train"] if r.get("tokens_per_s") is not None and r.get("elapsed_s") is not None]
    if timed:
        fig, ax1 = plt.subplots(figsize=(7, 3.8))
        hours = [r["elapsed_s"] / 3600 for r in timed]
        ax1.plot(hours, [r["tokens_per_s"] for r in timed], color="tab:blue")
        ax1.set_xlabel("training time (h)")
        ax1.set_ylabel("tokens/s (real, all ranks)", color="tab:blue")
        if any(r.get("mfu") is not None for r in timed):
            ax2 = ax1.twinx()
            ax2.plot(hours, [100 * (r.get("mfu") or 0) for r in timed], color="tab:red")
            ax2.set_ylabel("MFU (%)", color="tab:red")
        files["throughput"] = save_figure(fig, pdir / "throughput.png")
    return files


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, label in zip(handles, labels):
        seen.setdefault(label, h)
    ax.legend(seen.values(), seen.keys(), fontsize=8)


def markdown(run: dict, files: dict[str, Path]) -> str:
    r, st, train = run["recipe"], run["status"], run["train"]
    last = train[-1] if train else {}
    lines = [f"# {r.name}: pretraining run", ""]
    wall = st.get("wall_s")
    lines += [f"Status **{st.get('status', '?')}** at step {last.get('step', 0):,} of {r.train.max_steps:,}; "
              f"{st.get('world_size', '?')} process(es) on {st.get('device', '?')}, "
              f"{(st.get('train_precision') or {}).get('precision', r.train.precision)}, ZeRO {r.deepspeed.zero_stage}"
              + (f", {wall / 3600:.2f} h of training" if wall else "") + ".", ""]
    if train:
        best_val = min(run["validation"], key=lambda v: v["val_loss"]) if run["validation"] else None
        lines += ["## Loss", "", f"Last training loss {last['loss']:.4f} (step {last['step']:,})"
                  + (f"; best validation loss {best_val['val_loss']:.4f} at step {best_val['step']:,}" if best_val else "")
                  + ".", "", f"![loss](plots/{files['loss'].name})", ""]
    lines += ["## Downstream scores", ""]
    if run["downstream"]:
        lines += ["| step | tokens | task | metric | value | dev accuracy | dev F1 | note |", "|---|---|---|---|---|---|---|---|"]
        for d in run["downstream"]:
            if "error" in d:
                lines.append(f"| {d['step']:,} | {d['tokens']:,} | | | | | | failed: {d['error'][:120]} |")
            elif d["task"] == "harness":  # lm-evaluation-harness metrics: as the harness reports them
                lines.append(f"| {d['step']:,} | {d['tokens']:,} | harness | {d['metric']} | {d['value']:.4f} | | | |")
            else:
                f1 = f"{100 * d['dev_f1']:.2f}" if d.get("dev_f1") is not None else ""
                lines.append(f"| {d['step']:,} | {d['tokens']:,} | {d['task']} | {d['metric']} | "
                             f"{100 * d['value']:.2f} | {100 * d['dev_accuracy']:.2f} | {f1} | |")
        pending = (st.get("downstream") or {}).get("pending") or []
        if pending:
            lines += ["", f"Still being scored: step(s) {', '.join(map(str, pending))}."]
        if "downstream" in files:
            lines += ["", f"![downstream](plots/{files['downstream'].name})"]
    else:
        lines.append("None (the recipe's `downstream:` section chooses checkpoints to fine-tune and score).")
    lines.append("")
    if "throughput" in files:
        timed = [t for t in train if t.get("tokens_per_s")]
        mfus = [t["mfu"] for t in timed if t.get("mfu") is not None]
        lines += ["## Throughput", "", f"Median {median([t['tokens_per_s'] for t in timed]):,.0f} tokens/s"
                  + (f", median MFU {100 * median(mfus):.1f}%" if mfus else "") + ".", "",
                  f"![throughput](plots/{files['throughput'].name})", ""]
    skipped = last.get("spikes_skipped", 0) or 0
    lines += ["## Spikes and restarts", "",
              f"{skipped} update(s) skipped for loss spikes, {len(run['rollbacks'])} rollback(s), "
              f"{int(last.get('skipped_steps', 0) or 0)} step(s) skipped on fp16 overflow, "
              f"{len(run['restarts'])} restart(s).", ""]
    if run["rollbacks"] or run["restarts"]:
        lines += ["| step | event | detail |", "|---|---|---|"]
        events = sorted([*run["rollbacks"], *run["restarts"]], key=lambda e: e["step"])
        for e in events:
            detail = (f"from step {e['from_step']}, data steps {e['skipped_data_steps'][0] + 1}-"
                      f"{e['skipped_data_steps'][1] + 1} skipped" if e["event"] == "rollback"
                      else f"on {e.get('world_size', '?')} process(es)")
            lines.append(f"| {e['step']:,} | {e['event']} | {detail} |")
        lines.append("")
    return "\n".join(lines)


def build_run_report(run_dir: Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    run = collect(run_dir)
    files = plots(run_dir, run)
    md = markdown(run, files)
    (run_dir / "report.md").write_text(md)
    (run_dir / "report.html").write_text(to_html(md, files, f"fpm run: {run['recipe'].name}"))
    return {"md": run_dir / "report.md", "html": run_dir / "report.html", **files}
