"""`fpm evaluate TASK`: score (dev) or predict (test) with a fine-tuned classifier, no training."""

from __future__ import annotations

import os
from pathlib import Path

from fpm.classifier import check_classifier, load_init
from fpm.config import load_recipe
from fpm.config.schema import FinetuneRecipe
from fpm.console import info, is_rank0, warn
from fpm.data.tasks import load_split, skipped_rows, tnews_label_names
from fpm.errors import FpmError
from fpm.eval.predict import predict
from fpm.eval.results import write_results
from fpm.eval.summary import summary
from fpm.rundir import RunDir


def finetune_recipe(task: str, preset, overrides, epochs, max_steps, seed) -> FinetuneRecipe:
    sets = list(overrides or [])
    for key, value in (("train.epochs", epochs), ("train.max_steps", max_steps), ("train.seed", seed)):
        if value is not None:
            sets.append(f"{key}={value}")
    return load_recipe(task, preset=preset, overrides=sets, kind="finetune")


def evaluate_command(task: str, *, model_path: Path, data_dir: Path | None, split: str, out: Path | None,
                     preset: str | None = None, overrides: list[str] | None = None) -> dict | None:
    """Evaluate (dev) or predict (test) with a fine-tuned classifier, without training."""
    if split not in ("dev", "test", "train"):
        raise FpmError(f"--split must be dev or test, not {split!r}")
    recipe = finetune_recipe(task, preset, overrides, None, None, None)
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
