"""`fpm report DIR`: the depth-study report, rebuilt from the cells' own files.

Writes ``DIR/results.json`` (every cell's metrics and the summary), ``DIR/report.md``,
``DIR/report.html`` (self-contained: plots embedded) and ``DIR/plots/*.png``. Nothing is computed
during the sweep that is not recomputed here: the report is a pure function of the cell files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fpm.config import load_resolved
from fpm.errors import FpmError
from fpm.eval.page import to_html
from fpm.eval.study_plots import METRICS, plots
from fpm.eval.stats import at_budget, bootstrap_best, mean_std, neighbour_tests
from fpm.paper import TABLE3_QQP_DEV
from fpm.rundir import AUDIT, SWEEP_PLAN, RunDir, cell_state, read_json



def collect(out: Path) -> tuple[dict, list[dict]]:
    from fpm.engine.flops import train_flops_per_token
    from fpm.engine.metrics import read_metrics
    from fpm.study.plan import SweepPlan

    plan_json = read_json(out / SWEEP_PLAN)
    if plan_json is None:
        raise FpmError(f"{out}: no sweep.json (not a sweep directory)")
    plan = SweepPlan.from_json(plan_json)
    cells = []
    for cell in plan.cells:
        cdir = cell.dir(out)
        state = cell_state(cdir) or {"status": "not started"}
        res = read_json(RunDir(cdir / "finetune").results)
        status = state.get("status", "not started")
        if res is not None and status in ("done", "submitted"):
            status = "done"  # SLURM cells finish in their own jobs
        elif status == "done":
            status = "incomplete"
        row = {"name": cell.name, "depth": cell.depth, "layers": cell.layers, "seed": cell.seed, "status": status}
        if res is not None:
            row.update({k: res[k] for k in (*METRICS, "n_examples", "macro_f1")})
            row["fields"] = res.get("fields")
            preds = [json.loads(x) for x in (cdir / "finetune" / "predictions_dev.jsonl").read_text().splitlines()]
            row["_correct"] = {p["id"]: bool(p["correct"]) for p in preds}
        scratch = read_json(RunDir(cdir / "finetune-scratch").results)
        if scratch is not None:  # the control: the same architecture fine-tuned from scratch
            row["scratch"] = {k: scratch[k] for k in METRICS}
        logged = read_metrics(cdir / "pretrain")
        curve = [(m["step"], m["loss"]) for m in logged if "loss" in m]
        row["pretrain_loss"] = curve
        row["validation_loss"] = [(m["step"], m["val_loss"]) for m in logged if m.get("split") == "validation"]
        run = RunDir(cdir / "pretrain").status()
        if RunDir(cdir / "pretrain").recipe.is_file():
            r = load_resolved(RunDir(cdir / "pretrain").recipe)
            samples = curve[-1][0] * (r.train.global_batch or 0) if curve else 0
            tokens = samples * r.data.seq_len
            row["cost"] = {"pretrain_wall_s": run.get("wall_s"), "pretrain_tokens": tokens,
                           "pretrain_flops": tokens * train_flops_per_token(r.model, r.tokenizer.vocab_size,
                                                                            r.data.seq_len),
                           "finetune_wall_s": (state.get("finetune") or {}).get("wall_s")}
        row["points"] = _points(plan, cell, cdir, row)
        if row["status"] == "failed":
            row["failure"] = {k: state.get(k) for k in ("pretrain", "finetune")}
        cells.append(row)
    return plan_json, cells


def _points(plan, cell, cdir: Path, row: dict) -> list[dict]:
    """The cell's fine-tuned checkpoints — the equal-compute ones (fine-tuned beside the pretraining,
    ``pretrain/downstream/``) and the last (its own fine-tuning) — with their pretraining FLOPs."""
    from fpm.eval.downstream import folder

    per_step = plan.flops_per_step.get(cell.depth)
    found = [(s, folder(cdir / "pretrain", s) / "finetune") for s in cell.compute_steps]
    if "accuracy" in row:
        found.append((plan.max_steps, cdir / "finetune"))
    out = []
    for step, ft in found:
        res = read_json(RunDir(ft).results)
        if res is None or per_step is None:
            continue
        preds = [json.loads(x) for x in (ft / "predictions_dev.jsonl").read_text().splitlines()]
        out.append({"step": step, "flops": step * per_step, **{k: res[k] for k in METRICS},
                    "_correct": {p["id"]: bool(p["correct"]) for p in preds}})
    return out


def equal_compute(plan: dict, cells: list[dict]) -> dict | None:
    """Accuracy at the cheapest depth's whole-run compute, per depth (each seed's checkpoint with the
    most FLOPs not above it), with the bootstrap and the neighbour tests on those checkpoints."""
    ok = [c for c in cells if c["status"] == "done" and c.get("points")]
    depths = sorted({c["depth"] for c in ok})
    if len(depths) < 2:
        return None
    budget = min(max(p["flops"] for c in ok if c["depth"] == d for p in c["points"]) for d in depths)
    by_depth = {d: [c["points"] for c in sorted((c for c in ok if c["depth"] == d), key=lambda c: c["seed"])]
                for d in depths}
    chosen = {d: pts for d, pts in at_budget(by_depth, budget).items() if len(pts) == len(plan["seeds"])}
    if len(chosen) < 2:
        return {"budget_flops": budget, "per_depth": {}, "sentence": "Fewer than two depths have a checkpoint "
                "at or below the cheapest depth's compute for every seed: no equal-compute comparison."}
    per = {d: {"steps": [p["step"] for p in pts], "flops": float(np.mean([p["flops"] for p in pts])),
               **{k: dict(zip(("mean", "std"), mean_std([p[k] for p in pts]))) for k in METRICS}}
           for d, pts in chosen.items()}
    order = sorted(chosen)
    ids = sorted(set.intersection(*[set(p["_correct"]) for d in order for p in chosen[d]]))
    arr = np.array([[[p["_correct"][i] for i in ids] for p in chosen[d]] for d in order], dtype=np.float64)
    boot = bootstrap_best(arr, order, n_boot=plan.get("bootstrap_samples", 2000), confidence=plan.get("confidence", 0.95))
    neighbours = neighbour_tests(arr, order, alpha=1 - plan.get("confidence", 0.95))
    where = ", ".join(f"depth {d} after {per[d]['steps'][0]:,} steps" for d in order)
    said = verdict(boot, neighbours)
    sentence = (f"At equal pretraining compute ({budget:.3g} FLOPs, the cheapest depth's whole run; {where}): "
                + said[0].lower() + said[1:])
    return {"budget_flops": budget, "per_depth": per, "bootstrap": boot, "neighbours": neighbours,
            "n_dev_examples": len(ids), "sentence": sentence}


def summarize(plan: dict, cells: list[dict]) -> dict:
    depths = sorted(set(plan["depths"]))
    ok = [c for c in cells if c["status"] == "done" and "accuracy" in c]
    per_depth = {}
    for d in depths:
        rows = [c for c in ok if c["depth"] == d]
        if not rows:
            continue
        entry = {"layers": rows[0]["layers"], "seeds": [c["seed"] for c in rows]}
        for k in METRICS:
            m, s = mean_std([c[k] for c in rows])
            entry[k] = {"mean": m, "std": s}
        controls = [c["scratch"] for c in rows if c.get("scratch")]
        if controls:
            entry["scratch"] = {k: dict(zip(("mean", "std"), mean_std([c[k] for c in controls]))) for k in METRICS}
            entry["scratch"]["n"] = len(controls)
        costs = [c.get("cost", {}) for c in rows]
        entry["cost"] = {k: float(np.mean([c[k] for c in costs if c.get(k) is not None]))
                         if any(c.get(k) is not None for c in costs) else None
                         for k in ("pretrain_wall_s", "pretrain_tokens", "pretrain_flops", "finetune_wall_s")}
        per_depth[d] = entry
    summary = {"depths": depths, "per_depth": per_depth, "n_cells": len(cells), "n_done": len(ok),
               "failed": [c["name"] for c in cells if c["status"] == "failed"],
               "missing": [c["name"] for c in cells if c["status"] not in ("done", "failed")],
               "synthetic_data": plan["synthetic_data"], "synthetic_task": plan["synthetic_task"],
               "task": plan["task"], "recipe": plan["recipe"], "preset": plan["preset"],
               "fields": next((c["fields"] for c in ok if c.get("fields")), None)}
    # statistics on the depths that have every seed, over the dev examples all of them scored
    complete = [d for d in depths if d in per_depth and len(per_depth[d]["seeds"]) == len(plan["seeds"])]
    if len(complete) >= 2:
        ids = sorted(set.intersection(*[set(c["_correct"]) for c in ok if c["depth"] in complete]))
        arr = np.array([[[c["_correct"][i] for i in ids] for c in sorted((c for c in ok if c["depth"] == d),
                                                                          key=lambda c: c["seed"])]
                        for d in complete], dtype=np.float64)
        boot = bootstrap_best(arr, complete, n_boot=plan.get("bootstrap_samples", 2000),
                              confidence=plan.get("confidence", 0.95))
        summary["bootstrap"] = boot
        summary["neighbours"] = neighbour_tests(arr, complete, alpha=1 - plan.get("confidence", 0.95))
        summary["n_dev_examples"] = len(ids)
        summary["verdict"] = verdict(boot, summary["neighbours"])
    else:
        summary["verdict"] = "fewer than two depths finished with every seed: no comparison possible yet"
    floors = read_json(Path(plan["out"]) / "floors.json")
    if floors:
        summary["floors"] = floors
        tfidf = floors["tfidf"]["accuracy"]
        beat = [d for d, e in per_depth.items() if e["accuracy"]["mean"] > tfidf]
        same_inputs = floors.get("fields") == summary["fields"]
        summary["floor_verdict"] = (
            (f"No depth beats the TF-IDF + logistic regression floor ({100 * tfidf:.2f} accuracy)." if not beat else
             f"Depths above the TF-IDF floor ({100 * tfidf:.2f}): {', '.join(map(str, beat))}; below it: "
             f"{', '.join(str(d) for d in per_depth if d not in beat) or 'none'}.")
            + ("" if same_inputs else f" (The floors used input {'+'.join(floors.get('fields') or [])}, the models "
                                      f"{'+'.join(summary['fields'] or [])}: not the same inputs.)"))
    summary["equal_compute"] = equal_compute(plan, cells) if plan.get("equal_compute") else None
    summary["takeaway"] = takeaway(summary)
    audit = read_json(Path(plan["out"]) / AUDIT)
    if audit and "dev" in audit["splits"] and "also_in_train_normalised" in audit["splits"]["dev"]:
        dv = audit["splits"]["dev"]
        summary["audit"] = {"dev_examples": dv["examples"], "majority_share": dv["majority_share"],
                            "dev_also_in_train_exact": dv["also_in_train_exact"]["count"],
                            "dev_also_in_train_normalised": dv["also_in_train_normalised"]["count"],
                            "unit": audit["unit"]}
    return summary


def takeaway(summary: dict) -> str:
    """The one sentence a reader should take from the report: where the depths land between the
    floors, and what pretraining adds over the from-scratch controls."""
    per = summary["per_depth"]
    if not per:
        return "No cell has finished yet."
    acc = {d: 100 * e["accuracy"]["mean"] for d, e in per.items()}
    lo, hi = min(acc.values()), max(acc.values())
    parts = [f"Every depth reaches {lo:.1f}–{hi:.1f}% dev accuracy" if lo != hi else f"Dev accuracy is {lo:.1f}%"]
    floors = summary.get("floors") or {}
    majority = (floors.get("majority") or {}).get("accuracy")
    tfidf = (floors.get("tfidf") or {}).get("accuracy")
    if majority is not None:
        parts.append(f"{lo - 100 * majority:+.1f} points or more over the majority class ({100 * majority:.1f}%)")
    if tfidf is not None:
        parts.append(f"against {100 * tfidf:.1f}% for TF-IDF + logistic regression")
    sentence = ", ".join(parts)
    gains = {d: acc[d] - 100 * e["scratch"]["accuracy"]["mean"] for d, e in per.items() if e.get("scratch")}
    if gains:
        above = [d for d, g in gains.items() if g > 0]
        sentence += (f"; pretraining adds {min(gains.values()):+.1f} to {max(gains.values()):+.1f} points over the same "
                     f"models fine-tuned from scratch (above their control at {len(above)} of {len(gains)} depths)")
    sentence += "; " + summary["verdict"][0].lower() + summary["verdict"][1:] if summary.get("verdict") else ""
    sentence = sentence.rstrip(".") + "."
    eq = summary.get("equal_compute")
    return sentence + (" " + eq["sentence"] if eq and eq.get("per_depth") else "")


def verdict(boot: dict, neighbours: list[dict]) -> str:
    best = boot["best_depth"]
    pd = boot["per_depth"][best]
    conf = int(round(100 * boot["confidence"]))
    tie = f" (tied with {', '.join(map(str, boot['tied_with']))})" if boot.get("tied_with") else ""
    text = (f"best depth {best}{tie}: accuracy {100 * pd['accuracy']:.2f} ({conf}% CI {100 * pd['lo']:.2f}–"
            f"{100 * pd['hi']:.2f}), best in {100 * pd['p_best']:.0f}% of bootstrap resamples. ")
    if boot["clearly_best"]:
        text += f"Its margin over every other depth has a {conf}% CI above zero: it is clearly best."
    else:
        close = [str(d) for d, m in boot["margins"].items() if not m["excludes_zero"]]
        text += (f"Not clearly best: the {conf}% CI of its margin includes zero against depth(s) "
                 f"{', '.join(close)}.")
    sig = [f"{n['shallower']}→{n['deeper']}" for n in neighbours if n["significant"]]
    text += (f" Neighbouring depths that differ significantly (paired permutation test, p<{1 - boot['confidence']:.2f}): "
             f"{', '.join(sig) if sig else 'none'}.")
    return text


# ------------------------------------------------------------------ documents


def _pct(x: dict) -> str:
    return f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f}"


def markdown(summary: dict, cells: list[dict], files: dict[str, Path]) -> str:
    per = summary["per_depth"]
    lines = [f"# Depth study: {summary['recipe']} on {summary['task']}", ""]
    if summary["synthetic_task"] or summary["synthetic_data"]:
        which = [w for w, flag in (("pretraining corpus", summary["synthetic_data"]),
                                   (f"{summary['task']} task", summary["synthetic_task"])) if flag]
        lines += [f"> **Synthetic data.** The {' and the '.join(which)} are generated by fpm "
                  "(`fpm/data/synthetic.py`), not real text: these numbers show the pipeline works and how "
                  "sure the statistics are; they say nothing about the paper's claim.", ""]
    lines += [f"**In one sentence.** {summary['takeaway']}", ""]
    lines += [f"Preset: {summary['preset'] or 'none'}. Input fields: {' + '.join(summary['fields'] or [])}. "
              f"Cells done: {summary['n_done']}/{summary['n_cells']}"
              + (f"; failed: {', '.join(summary['failed'])}" if summary["failed"] else "")
              + (f"; not finished: {', '.join(summary['missing'])}" if summary["missing"] else "") + ".", ""]
    lines += ["## Results on dev (mean ± std over seeds, %)", "",
              "| depth | layers run | seeds | precision | recall | f1 | acc. | acc. from scratch | pretraining adds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d, e in per.items():
        ctl = e.get("scratch")
        shown = _pct(ctl["accuracy"]) if ctl and ctl["n"] > 1 else f"{100 * ctl['accuracy']['mean']:.2f}" if ctl else ""
        extra = f"{shown} | {100 * (e['accuracy']['mean'] - ctl['accuracy']['mean']):+.2f}" if ctl else "– | –"
        lines.append(f"| {d} | {e['layers']} | {len(e['seeds'])} | " + " | ".join(_pct(e[k]) for k in METRICS)
                     + f" | {extra} |")
    floors = summary.get("floors") or {}
    for name, f in floors.items():
        if isinstance(f, dict) and "accuracy" in f:
            lines.append(f"| floor: {name} ({'+'.join(floors.get('fields') or [])}) | – | – | "
                         + " | ".join(f"{100 * f[k]:.2f}" for k in METRICS) + " | – | – |")
    lines += ["", "\"acc. from scratch\" is the control: the same architecture and vocabulary fine-tuned with the "
              "same settings from freshly initialised weights (`fpm finetune --from-scratch`; each depth's first "
              "seed); \"pretraining adds\" is the difference in mean accuracy.", ""]
    if summary["task"] == "qqp":
        lines += ["Paper, Table 3 (GLUE QQP dev, one run per depth, %):", "",
                  "| depth | model | precision | recall | f1 | acc. |", "|---|---|---|---|---|---|"]
        for d, r in TABLE3_QQP_DEV.items():
            lines.append(f"| {d} | {r['model']} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} | {r['accuracy']:.2f} |")
        note = ("not comparable: fpm's numbers here are on synthetic data" if summary["synthetic_task"] else
                "comparable only when the dev set is GLUE QQP's own and the models are full size")
        lines += ["", f"The paper's numbers are from full-size models on GLUE QQP ({note}).", ""]
    lines += ["## Which depth is best, and how sure are we", "", summary["verdict"], ""]
    if summary.get("floor_verdict"):
        lines += [summary["floor_verdict"], ""]
    if summary.get("audit"):
        a = summary["audit"]
        lines += [f"Data audit: {a['dev_also_in_train_normalised']:,} of {a['dev_examples']:,} dev {a['unit']}s also occur "
                  f"in train after normalisation ({a['dev_also_in_train_exact']:,} exactly); the majority class is "
                  f"{100 * (a['majority_share'] or 0):.1f}% of dev (see audit.json).", ""]
    boot = summary.get("bootstrap")
    if boot:
        lines += [f"Bootstrap over dev examples (paired across depths) and seeds, {boot['n_boot']} resamples, "
                  f"{summary.get('n_dev_examples')} dev examples:", "",
                  "| depth | accuracy | CI low | CI high | P(best) |", "|---|---|---|---|---|"]
        for d, e in boot["per_depth"].items():
            lines.append(f"| {d} | {100 * e['accuracy']:.2f} | {100 * e['lo']:.2f} | {100 * e['hi']:.2f} | {e['p_best']:.2f} |")
        lines += ["", "| comparison | accuracy difference | p-value | significant |", "|---|---|---|---|"]
        for n in summary["neighbours"]:
            lines.append(f"| {n['deeper']} vs {n['shallower']} | {100 * n['diff']:+.2f} | {n['p_value']:.4f} | "
                         f"{'yes' if n['significant'] else 'no'} |")
        lines.append("")
    eq = summary.get("equal_compute")
    if eq:
        lines += ["## At equal compute", "", eq["sentence"], ""]
        if eq["per_depth"]:
            lines += ["Each deeper depth's checkpoint with the most pretraining FLOPs not above the cheapest depth's "
                      "whole run, fine-tuned with the same settings (dev, mean ± std over seeds, %):", "",
                      "| depth | steps | FLOPs | acc. | f1 |", "|---|---|---|---|---|"]
            for d, e in eq["per_depth"].items():
                lines.append(f"| {d} | {', '.join(f'{x:,}' for x in sorted(set(e['steps'])))} | {e['flops']:.3g} | "
                             f"{_pct(e['accuracy'])} | {_pct(e['f1'])} |")
            lines.append("")
    lines += ["## Cost per depth", "", "| depth | pretraining wall (s) | tokens | FLOPs | fine-tuning wall (s) |",
              "|---|---|---|---|---|"]
    for d, e in per.items():
        c = e["cost"]
        lines.append(f"| {d} | {c['pretrain_wall_s'] or 0:.0f} | {c['pretrain_tokens'] or 0:,.0f} | "
                     f"{c['pretrain_flops'] or 0:.3g} | {c['finetune_wall_s'] or 0:.0f} |")
    val = {c["depth"]: c["validation_loss"][-1] for c in cells if c.get("validation_loss")}
    if val:
        lines += ["", "Validation loss (the prepared folder's held-out part) at the end of pretraining: "
                  + ", ".join(f"depth {d}: {v:.3f} (step {s})" for d, (s, v) in sorted(val.items()))
                  + ". The pretraining-loss plot draws it dashed beside the training loss: a gap that widens "
                    "with training is overfitting, one that does not is the model learning the language."]
    lines += ["", "## Plots", ""]
    captions = {
        "metrics": "What to see: each depth's pretrained models (solid, with seed spread) above the majority floor "
                   "and the dashed from-scratch controls; the gap to the controls is what pretraining adds.",
        "loss": "What to see: every depth's pretraining loss falls; the dashed held-out loss follows it (no "
                "overfitting) and deeper models end lower or level.",
        "cost": "What to see: the cost of each depth, growing with the layer count; weigh it against the "
                "accuracy differences above.",
        "compute": "What to see: accuracy against pretraining compute; at the dotted line (the cheapest depth's "
                   "whole run) the depths compare at equal compute.",
    }
    for key, path in files.items():
        lines += [f"![{key}](plots/{path.name})", "", captions.get(key, ""), ""]
    lines += ["", "## Cells", "", "| cell | depth | seed | status | accuracy | f1 |", "|---|---|---|---|---|---|"]
    for c in cells:
        acc = f"{100 * c['accuracy']:.2f}" if "accuracy" in c else "–"
        f1 = f"{100 * c['f1']:.2f}" if "f1" in c else "–"
        lines.append(f"| {c['name']} | {c['depth']} | {c['seed']} | {c['status']} | {acc} | {f1} |")
    return "\n".join(lines) + "\n"


def build_report(out: Path) -> dict[str, Path]:
    out = Path(out)
    plan, cells = collect(out)
    summary = summarize(plan, cells)
    files = plots(out, cells, summary)
    public_cells = [{k: ([{pk: pv for pk, pv in p.items() if not pk.startswith("_")} for p in v] if k == "points" else v)
                     for k, v in c.items() if not k.startswith("_")} for c in cells]
    (out / "results.json").write_text(json.dumps({"plan": plan, "cells": public_cells, "summary": summary},
                                                 indent=1, default=str))
    md = markdown(summary, public_cells, files)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(to_html(md, files, f"fpm depth study: {plan['recipe']} on {plan['task']}"))
    return {"md": out / "report.md", "html": out / "report.html", "json": out / "results.json", **files}
