"""`fpm finetune TASK`: classification on GLUE QQP and CLUE TNEWS.

Fine-tuning runs through the same engine as pretraining (DeepSpeed, checkpoints, exact resume,
signals); the dev set is evaluated every ``train.eval_every`` steps and at the end, and the best
model by the task's metric is kept in ``OUT/best`` as a Hugging Face folder. The final report,
``results.json``, is computed on dev with the best model; the unlabeled test split only ever
produces the official submission files (GLUE ``QQP.tsv``, CLUE ``tnews_predict.json``) and no score.

The pieces: pair encoding and the training stream (:mod:`fpm.data.pairs`), the classifier
(:mod:`fpm.classifier`), dev evaluation (:mod:`fpm.eval.predict`), results and the console
summary (:mod:`fpm.eval.results`, :mod:`fpm.eval.summary`); `fpm evaluate` is :mod:`fpm.commands.evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fpm.classifier import Init, load_init, save_model
from fpm.config import dump_recipe, load_recipe
from fpm.config.schema import FinetuneRecipe
from fpm.console import info, warn
from fpm.data.pairs import training_set
from fpm.data.tasks import load_split, skipped_rows, tnews_label_names
from fpm.engine.trackers import Trackers, check_installed
from fpm.errors import FpmError
from fpm.eval.metrics import task_metrics
from fpm.eval.predict import predict
from fpm.eval.results import write_results
from fpm.eval.summary import summary
from fpm.models.classification import classification_loss
from fpm.rundir import RunDir, write_json


class DevEvaluation:
    """The trainer's periodic hook: scores dev with the model being trained (on its device) and
    keeps the best model so far in ``OUT/best`` (``best.json`` says which step)."""

    def __init__(self, model: torch.nn.Module, recipe: FinetuneRecipe, features: dict[str, np.ndarray],
                 labels: list[int], out: Path, init: Init, rank: int, world_size: int):
        self.model, self.task, self.features, self.labels = model, recipe.task, features, labels
        self.out, self.init, self.rank, self.world_size = out, init, rank, world_size
        self.best_file = RunDir(out).best_json

    def best(self) -> dict | None:
        return json.loads(self.best_file.read_text()) if self.best_file.is_file() else None

    def __call__(self, step: int) -> dict:
        from fpm.engine.timeouts import while_rank0

        task = self.task
        probs = predict(self.model, self.features)
        value, m = task_metrics(task, self.labels, probs.argmax(1).tolist())
        best = self.best()

        def keep_best() -> None:
            if best is None or value > best["value"]:
                save_model(self.model, RunDir(self.out).best, self.init)
                self.best_file.write_text(json.dumps({"step": step, "metric": task.metric, "value": value}))

        # writing a large model takes long: the other ranks wait on the store, not in a barrier
        while_rank0(keep_best, f"saving the best model in {RunDir(self.out).best}", self.rank, self.world_size)
        return {"eval_step": step, f"dev_{task.metric}": value, "dev_accuracy": m["accuracy"], "dev_f1": m["f1"]}


def finetune(task: str, *, init: Path, data_dir: Path | None, out: Path | None = None, preset: str | None = None,
             overrides: list[str] | None = None, max_steps: int | None = None, epochs: float | None = None,
             seed: int | None = None, resume: str = "auto", with_floors: bool = True, from_scratch: bool = False,
             memory_check: bool = True, trackers: list[str] | None = None) -> int:
    from fpm.engine.distributed import resolve_env
    from fpm.engine.precision import for_run as choose_precision
    from fpm.engine.session import run_session, stop_signals

    with stop_signals():
        check_installed(trackers or [])
        recipe = load_recipe(task, preset=preset, overrides=overrides or [], kind="finetune",
                             flags={"train.epochs": ("--epochs", epochs), "train.max_steps": ("--max-steps", max_steps),
                                    "train.seed": ("--seed", seed)})
        out = Path(out) if out else Path("runs") / f"finetune-{recipe.task.name}"
        synthetic = data_dir is None and preset == "tiny"  # as the sweep does: a synthetic task of its own
        data_dir = out / "task" if synthetic else data_dir
        dist = resolve_env()
        recipe, precision = choose_precision(recipe, out, dist)
        if memory_check:
            check_memory(recipe, Path(init), dist)
        with run_session(out, "fpm finetune " + task, dist):  # the default collective timeout (3600 s)
            return _finetune(recipe, Path(init), data_dir, out, dist, resume, with_floors, synthetic, from_scratch,
                             precision.as_dict(), trackers or [])


def check_memory(recipe: FinetuneRecipe, init: Path, dist) -> None:
    """The launch check (:func:`fpm.engine.memory.finetune_launch_check`) before the model is loaded."""
    from fpm.classifier import encoder_shape
    from fpm.engine.distributed import select_accelerator
    from fpm.engine.memory import finetune_launch_check

    shape = encoder_shape(init, recipe.task.num_labels)
    if shape is not None:  # otherwise load_init names what is wrong with --init
        finetune_launch_check(recipe, shape, dist.world_size, dist.local_world_size, select_accelerator())


def _finetune(recipe: FinetuneRecipe, init_path: Path, data_dir: Path | None, out: Path, dist, resume: str,
              with_floors: bool = True, synthetic: bool = False, from_scratch: bool = False,
              precision: dict | None = None, trackers: list[str] | None = None) -> int:
    from fpm.engine.distributed import barrier
    from fpm.engine.spec import finetuning_spec
    from fpm.engine.timeouts import while_rank0
    from fpm.engine.trainer import Trainer
    from fpm.models.objective import Objective

    t = recipe.train
    rank0 = dist.rank == 0
    if recipe.deepspeed.zero_stage == 3:
        raise FpmError("fine-tuning supports ZeRO stages 0-2 (the best model is saved from whole weights)")
    if synthetic and rank0 and not (data_dir / "dev.tsv").is_file() and not (data_dir / "dev.json").is_file():
        from fpm.data.synthetic import write_qqp, write_tnews

        info(f"no --data-dir: writing a synthetic {recipe.task.name} task (official layout) in {data_dir}; "
             "its scores say whether fpm learns, not how the paper's model does")
        (write_qqp if recipe.task.name == "qqp" else write_tnews)(data_dir)
    barrier()
    splits = {name: load_split(recipe.task, data_dir, name, required=name != "test")
              for name in ("train", "dev", "test")}
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for s in splits.values():
            if s is not None and (skipped := skipped_rows(s)):
                warn(skipped)
        RunDir(out).recipe.write_text(dump_recipe(recipe))
    barrier()
    train, dev, task = splits["train"], splits["dev"], recipe.task
    spec = finetuning_spec(recipe, dist.world_size, len(train.examples))
    steps = spec.max_steps
    init: Init | None = None

    def classifier() -> Objective:  # called by the trainer, after seeding: the new head's weights follow the seed
        nonlocal init
        init = load_init(init_path, recipe, from_scratch=from_scratch)
        return Objective(init.model, classification_loss)

    track = Trackers(trackers or [], out, out.name, recipe.model_dump(mode="json"), enabled=rank0)
    trainer = Trainer(spec, classifier, out, dist, resume=resume == "auto", trackers=track)
    feats = {name: init.encoder.encode(s.examples) for name, s in splits.items() if s is not None}
    labels = np.asarray([e.label for e in train.examples], dtype=np.int64)
    # the model the trainer trains, in place (moved to its device, cast to its dtype by the engine)
    evaluate = DevEvaluation(init.model, recipe, feats["dev"], [e.label for e in dev.examples], out, init,
                             dist.rank, dist.world_size)
    if rank0:
        info(f"fine-tuning {init.source} on {task.name} ({len(train.examples):,} train, {len(dev.examples):,} dev"
             f"{', ' + format(len(splits['test'].examples), ',') + ' test' if splits['test'] else ''}): {steps} steps "
             f"of {t.batch_size}, input {' + '.join(task.fields)}")
    try:
        result = trainer.fit(training_set(feats["train"], labels, t), on_step=evaluate, on_step_every=spec.eval_every)
    except BaseException:
        track.close()
        raise
    if result.reason != "done":
        track.close()
        return result.exit_code
    best = evaluate.best()
    if best is None or best["step"] != result.step and result.step % spec.eval_every:
        evaluate(result.step)  # the last step is a candidate too
        best = evaluate.best()
    from transformers import AutoModelForSequenceClassification

    from fpm.engine.distributed import device_for

    # the best model scores dev and test on the training device, every rank a share of the rows
    model = AutoModelForSequenceClassification.from_pretrained(str(RunDir(out).best)).to(device_for(dist.local_rank))
    dev_probs = predict(model.eval(), feats["dev"])
    test_probs = predict(model, feats["test"]) if splits["test"] is not None else None

    def report() -> None:  # rank 0; the floors fit TF-IDF models: minutes on a large task
        names = tnews_label_names(Path(data_dir)) if task.name == "tnews" else {}
        extra = {"model": str(RunDir(out).best), "init": init.source, "from_scratch": from_scratch,
                 "best_step": best["step"], "steps": result.step,
                 "device": str(next(model.parameters()).device), "train_precision": precision,
                 "speed_ups": trainer.speed_ups}
        results = write_results(out, recipe, dev, dev_probs, extra, names)
        if test_probs is not None:
            write_results(out, recipe, splits["test"], test_probs, extra, names)
            info(f"test: wrote the submission file in {out} (test labels are not public: no score)")
        from fpm.eval.audit import audit_splits
        from fpm.eval.floors import floors as compute_floors

        aud = audit_splits(task, {k: v for k, v in splits.items() if v is not None})
        write_json(RunDir(out).audit, aud)
        floor = compute_floors(task, {k: v for k, v in splits.items()}, RunDir(out).floors_dir, names) if with_floors else None
        results["floors"] = floor
        results["audit"] = {"dev_also_in_train_normalised": aud["splits"]["dev"]["also_in_train_normalised"]["count"],
                            "dev_also_in_train_exact": aud["splits"]["dev"]["also_in_train_exact"]["count"],
                            "dev_majority_share": aud["splits"]["dev"]["majority_share"]}
        write_json(RunDir(out).results, results)
        track.summary(results)
        summary(results, recipe, Path(data_dir), floor, aud)

    while_rank0(report, "the results, audit and floors", dist.rank, dist.world_size)
    track.close()
    return 0
