"""`fpm evaluate TASK`: score (dev) or predict (test) with a fine-tuned classifier, no training."""

from __future__ import annotations

import os
from pathlib import Path

from fpm.classifier import check_classifier, load_init
from fpm.config import load_recipe
from fpm.console import info, is_rank0, warn
from fpm.data.tasks import load_split, skipped_rows, tnews_label_names
from fpm.errors import FpmError
from fpm.eval.predict import predict
from fpm.eval.results import write_results
from fpm.eval.summary import summary
from fpm.rundir import RunDir


def evaluate_command(task: str, *, model_path: Path, data_dir: Path | None, split: str, out: Path | None,
                     preset: str | None = None, overrides: list[str] | None = None) -> dict | None:
    """Evaluate (dev) or predict (test) with a fine-tuned classifier, without training."""
    if split not in ("dev", "test", "train"):
        raise FpmError(f"--split must be dev or test, not {split!r}")
    recipe = load_recipe(task, preset=preset, overrides=overrides or [], kind="finetune")
    model_path = Path(model_path)
    if (RunDir(model_path).best / "config.json").is_file():
        model_path = RunDir(model_path).best
    check_classifier(model_path, recipe.task.num_labels)
    init = load_init(model_path, recipe)
    data = load_split(recipe.task, data_dir, split)
    if skipped := skipped_rows(data):
        warn(skipped)
    out = Path(out) if out else model_path.parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    from fpm.engine.distributed import device_for, select_accelerator

    select_accelerator()
    probs = predict(init.model.to(device_for(int(os.environ.get("LOCAL_RANK", "0")))), init.encoder.encode(data.examples))
    names = tnews_label_names(Path(data_dir)) if recipe.task.name == "tnews" else {}
    results = write_results(out, recipe, data, probs, {"model": str(model_path)}, names)
    if results is None:
        info(f"{split}: wrote the submission file and predictions in {out} (no labels: no score)")
    elif is_rank0():
        summary(results, recipe, Path(data_dir))
    return results


def evaluate_lm(run_dir: Path, *, data_dir: Path | None = None, tag: str | None = None,
                batches: int | None = None, out: Path | None = None) -> dict:
    """Validation loss, perplexity and bits per character of a pretraining run's checkpoint on a
    prepared folder's validation part (by default the run's own data: its sources' validation parts
    mixed by the run's weights, as training validated): the samples and the computation of
    validation while training (:mod:`fpm.engine.validation`), so the loss equals the one logged at
    that step. Bits per character = the part's summed cross-entropy (its mean times its tokens) /
    ln 2 / its characters (recorded by ``fpm data prepare``): comparable across vocabularies, exact
    only when every validation sample is scored (``--batches`` large), and for one folder only."""
    import torch

    from types import SimpleNamespace

    from fpm.data.mixture import build_mixture

    from fpm.engine.distributed import device_for
    from fpm.engine.spec import pretraining_spec
    from fpm.engine.validation import LocalEngine, Validation, bits_per_char
    from fpm.runs import load_run_model
    from fpm.models import objective
    from fpm.rundir import read_json, write_json

    run_dir = Path(run_dir)
    recipe, model, tok, folder = load_run_model(run_dir, tag)
    if data_dir is not None:
        sources = [(Path(data_dir), 1.0)]
    else:  # the run's sources and weights (run.json), else the folder its manifest names
        recorded = (read_json(RunDir(run_dir).run_json) or {}).get("data_sources") or []
        sources = [(Path(x["path"]), float(x["weight"])) for x in recorded]
        if not sources:
            manifest = read_json(RunDir(run_dir).data_manifest) or {}
            if not manifest.get("prepared_folder"):
                raise FpmError(f"{run_dir}: no data folder recorded; pass --data-dir DIR (a prepared folder)")
            sources = [(Path(manifest["prepared_folder"]), 1.0)]
    data_dir = ", ".join(f"{p}:{w:g}" if len(sources) > 1 else str(p) for p, w in sources)
    part = build_mixture(recipe, sources, part="validation")
    if part.tok.vocab_hash() != tok.vocab_hash():
        raise FpmError(f"{data_dir}: prepared with another vocabulary than {run_dir}'s; prepare it with the run's "
                       f"tokenizer ({RunDir(run_dir).tokenizer})")
    spec = pretraining_spec(recipe, 1, 0.0)
    n_batches = batches or recipe.train.eval_batches
    validation = Validation(part, spec.global_batch, spec.micro_batch, n_batches, SimpleNamespace(rank=0, world_size=1))
    metrics = validation.run(LocalEngine(objective(recipe.model, model), device_for(0)))
    bpc = bits_per_char(metrics, part.shards.manifest["validation"]) if len(sources) == 1 else None
    if bpc is not None:
        metrics["val_bits_per_char"] = bpc
    result = {"run": str(run_dir), "checkpoint": folder.name, "data": str(data_dir), "batches": n_batches,
              "part_samples": len(part), **metrics, "device": str(torch.device(device_for(0)))}
    out = Path(out) if out else run_dir / f"eval-lm-{folder.name}.json"
    write_json(out, result)
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    info(f"{run_dir} {folder.name} on {data_dir} (validation part, {metrics['val_samples']} of {len(part)} samples): "
         f"{shown}; written to {out}")
    return result


def evaluate_harness(model: Path, *, tasks: list[str], include_path: Path | None = None,
                     num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
                     tag: str | None = None, out: Path | None = None, log_samples: bool = False) -> dict:
    """EleutherAI's lm-evaluation-harness on a GPT or T5 run or exported folder (:mod:`fpm.eval.harness`)."""
    from fpm.eval.harness import evaluate

    res = evaluate(model, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                   batch_size=batch_size, tag=tag, out=out, log_samples=log_samples)
    for task, metrics in res["results"].items():
        shown = [f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                 if isinstance(v, float) and "stderr" not in k]
        info(f"{task}: {', '.join(shown)}")
    info(f"harness results in {res['out']}")
    return res
