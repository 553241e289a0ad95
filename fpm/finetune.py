"""`fpm finetune TASK` and `fpm evaluate TASK`: classification on GLUE QQP and CLUE TNEWS.

Fine-tuning runs through the same engine as pretraining (DeepSpeed, checkpoints, exact resume,
signals); the dev set is evaluated every ``train.eval_every`` steps and at the end, and the best
model by the task's metric is kept in ``OUT/best`` as a Hugging Face folder. The final report,
``results.json``, is computed on dev with the best model; the unlabeled test split only ever
produces the official submission files (GLUE ``QQP.tsv``, CLUE ``tnews_predict.json``) and no score.

Longer than 400 lines: encoding, the classifier's loading and `fpm evaluate` are still here;
moving them into data/ and eval/ is the next step of issue 18.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fpm.config import dump_recipe, load_recipe
from fpm.config.schema import FinetuneRecipe
from fpm.console import console, info, is_rank0, warn
from fpm.data.datasets import permute
from fpm.data.tasks import Split, load_split, tnews_label_names
from fpm.errors import FpmError
from fpm.eval.metrics import classification_metrics
from fpm.eval.results import write_results
from fpm.rundir import RunDir, write_json
from fpm.runlock import RunLock

# ------------------------------------------------------------------ encoding


class PairEncoder:
    """[CLS] a [SEP] (b [SEP]) with longest-first truncation, padded to ``max_len``."""

    def __init__(self, max_len: int, fpm_tokenizer=None, hf_tokenizer=None):
        if (fpm_tokenizer is None) == (hf_tokenizer is None):
            raise ValueError("give exactly one tokenizer")
        self.max_len, self.fpm, self.hf = max_len, fpm_tokenizer, hf_tokenizer

    def encode(self, examples) -> dict[str, np.ndarray]:
        n, L = len(examples), self.max_len
        if self.hf is not None:
            a = [e.texts[0] for e in examples]
            b = [e.texts[1] if len(e.texts) > 1 else None for e in examples]
            enc = self.hf(a, b if any(x for x in b) else None, truncation="longest_first", max_length=L,
                          padding="max_length", return_token_type_ids=True)
            return {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}
        sp = self.fpm.specials
        cols = list(zip(*[e.texts for e in examples]))
        encoded = [self.fpm.encode_batch(list(c)) for c in cols]
        ids = np.full((n, L), sp.pad, dtype=np.int64)
        types = np.zeros((n, L), dtype=np.int64)
        mask = np.zeros((n, L), dtype=np.int64)
        for i in range(n):
            segs = [list(enc[i]) for enc in encoded if enc[i] or enc is encoded[0]]
            budget = L - 1 - len(segs)
            while sum(map(len, segs)) > budget:  # longest first
                longest = max(range(len(segs)), key=lambda k: len(segs[k]))
                segs[longest].pop()
            row, typ = [sp.cls], [0]
            for k, seg in enumerate(segs):
                row += seg + [sp.sep]
                typ += [min(k, 1)] * (len(seg) + 1)
            ids[i, :len(row)] = row
            types[i, :len(typ)] = typ
            mask[i, :len(row)] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


class TaskDataset(torch.utils.data.Dataset):
    """Stream positions over epochs of the training examples, each epoch a fresh permutation
    (a pure function of (seed, position), as the pretraining datasets)."""

    def __init__(self, features: dict[str, np.ndarray], labels: np.ndarray, seed: int):
        self.features, self.labels, self.seed = features, labels, seed
        self.n = len(labels)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> dict:
        epoch, i = divmod(int(g), self.n)
        item = int(permute(i, self.n, self.seed * 1_000_003 + epoch))
        row = {k: v[item] for k, v in self.features.items()}
        row["labels"] = self.labels[item]
        return row


def classification_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                   attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])


@torch.no_grad()
def predict(model, features: dict[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Class probabilities for every row, in batches on the model's device (the model is put in eval
    mode and back). Under torch.distributed every rank scores a contiguous share of the rows and
    all ranks return all of them, finishing together."""
    import torch.distributed as td

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(features["input_ids"])
    rank, world = (td.get_rank(), td.get_world_size()) if td.is_initialized() else (0, 1)
    lo, hi = n * rank // world, n * (rank + 1) // world
    out = []
    for i in range(lo, hi, batch_size):
        batch = {k: torch.as_tensor(v[i:min(hi, i + batch_size)], device=device) for k, v in features.items()}
        logits = model(**batch).logits.float()
        out.append(torch.softmax(logits, dim=-1).cpu().numpy())
    if was_training:
        model.train()
    mine = np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)
    if world == 1:
        return mine
    shares: list = [None] * world
    td.all_gather_object(shares, mine)
    return np.concatenate(shares)


# ------------------------------------------------------------------ models


@dataclass
class Init:
    model: torch.nn.Module
    encoder: PairEncoder
    source: str
    fpm_tokenizer: object | None
    hf_tokenizer: object | None


def _classifier_from_pretraining(pre, num_labels: int, dropout: float):
    from transformers import MegatronBertForSequenceClassification

    from fpm.models.bert import use_sdpa

    config = pre.config.__class__.from_dict(pre.config.to_dict())
    config.num_labels = num_labels
    config.hidden_dropout_prob = dropout
    config.architectures = ["MegatronBertForSequenceClassification"]
    model = MegatronBertForSequenceClassification(config)
    model.bert.load_state_dict(pre.bert.state_dict(), strict=True)
    torch.nn.init.normal_(model.classifier.weight, std=config.initializer_range)
    torch.nn.init.zeros_(model.classifier.bias)
    use_sdpa(model)
    return model


def load_init(path: Path, recipe: FinetuneRecipe) -> Init:
    """An encoder to fine-tune: an fpm run directory or checkpoint, or a Hugging Face model folder."""
    path = Path(path)
    num_labels, L = recipe.task.num_labels, recipe.train.max_seq_len
    if not path.exists():
        raise FpmError(f"--init {path}: not found")
    run_dir, tag = path, None
    if path.parent.name == "checkpoints" and path.name.startswith("step-"):
        run_dir, tag = path.parent.parent, path.name
    if RunDir(run_dir).is_pretraining_run():
        from fpm.export import load_run_model

        pre_recipe, pre, tok, folder = load_run_model(run_dir, tag)
        if pre_recipe.model.family != "bert":
            raise FpmError(f"--init {path}: a {pre_recipe.model.family} model; fine-tuning classifies with BERT encoders")
        if L > pre_recipe.model.max_positions:
            raise FpmError(f"train.max_seq_len={L} exceeds the model's {pre_recipe.model.max_positions} positions")
        model = _classifier_from_pretraining(pre, num_labels, recipe.train.dropout)
        return Init(model, PairEncoder(L, fpm_tokenizer=tok), f"{folder}", tok, None)
    if (path / "config.json").is_file():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        fpm_tok = None
        if (path / "fpm_tokenizer").is_dir():
            from fpm.data.tokenizers import load_tokenizer_path

            meta = json.loads((path / "fpm_tokenizer" / "fpm_tokenizer.json").read_text())
            fpm_tok = load_tokenizer_path(meta["kind"], path / "fpm_tokenizer")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)
            hf_tok = None if fpm_tok is not None else AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise FpmError(f"--init {path}: cannot load a sequence-classification model ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]})") from None
        if hasattr(model.config, "hidden_dropout_prob"):
            model.config.hidden_dropout_prob = recipe.train.dropout
        encoder = PairEncoder(L, fpm_tokenizer=fpm_tok) if fpm_tok else PairEncoder(L, hf_tokenizer=hf_tok)
        return Init(model, encoder, str(path), fpm_tok, hf_tok)
    raise FpmError(f"--init {path}: neither an fpm run directory/checkpoint nor a Hugging Face model folder")


def check_classifier(path: Path, num_labels: int) -> None:
    """``fpm evaluate --model`` needs a fine-tuned classifier: refuse anything else, saying what it is
    (a pretraining run would be scored with an untrained classification head)."""
    if not path.exists():
        raise FpmError(f"--model {path}: not found")
    if RunDir(path).is_pretraining_run():
        raise FpmError(f"--model {path}: a pretraining run, whose classification head is untrained; fine-tune it "
                       f"first (fpm finetune TASK --init {path}) and evaluate that folder")
    config = path / "config.json"
    if not config.is_file():
        raise FpmError(f"--model {path}: no config.json; expected an `fpm finetune` output folder or a Hugging "
                       "Face sequence-classification model folder")
    try:
        cfg = json.loads(config.read_text())
    except ValueError:
        raise FpmError(f"{config}: not valid JSON") from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise FpmError(f"--model {path}: a {', '.join(archs) or 'model without architectures'}, not a fine-tuned "
                       "sequence classifier (fine-tune it first with fpm finetune)")
    labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels")
    if labels and labels != num_labels:
        raise FpmError(f"--model {path}: a classifier of {labels} labels; the task has {num_labels}")


def save_model(model, out: Path, init: Init) -> None:
    """A Hugging Face folder: weights + config + tokenizer (fpm's and, when it exists, HF's)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if init.fpm_tokenizer is not None:
        from fpm.export import export_tokenizer

        export_tokenizer(init.fpm_tokenizer, tmp)
    elif init.hf_tokenizer is not None:
        init.hf_tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ------------------------------------------------------------------ results


def summary(results: dict, recipe: FinetuneRecipe, data_dir: Path, floors: dict | None = None,
            audit: dict | None = None) -> None:
    """The closing table: the model beside its floors (same split, same inputs), with the paper only
    where the comparison is like for like, and what the data audit says about the split."""
    from rich.table import Table

    task = recipe.task
    t = Table(title=f"{task.name} {results['split']}: {results['n_examples']:,} examples, input "
                    f"{' + '.join(results['fields'])}")
    t.add_column("")
    for k in ("accuracy", "precision", "recall", "f1"):
        t.add_column(k if k != "f1" else results["f1_is"], justify="right")
    t.add_row("fpm (best checkpoint)", *(f"{100 * results[k]:.2f}" for k in ("accuracy", "precision", "recall", "f1")))
    notes = []
    if floors:
        same = floors.get("fields") == results["fields"]
        for name, label in (("majority", "floor: majority class"), ("tfidf", "floor: TF-IDF + logistic regression")):
            t.add_row(label + ("" if same else f" (input {'+'.join(floors['fields'])}: not comparable)"),
                      *(f"{100 * floors[name][k]:.2f}" for k in ("accuracy", "precision", "recall", "f1")))
        gap = results["accuracy"] - floors["tfidf"]["accuracy"]
        if gap <= 0:
            notes.append(f"the model does NOT beat the TF-IDF floor: accuracy {100 * results['accuracy']:.2f} vs "
                         f"{100 * floors['tfidf']['accuracy']:.2f}")
        else:
            notes.append(f"the model beats the TF-IDF floor by {100 * gap:.2f} accuracy points")
    paper = recipe.paper or {}
    if paper:
        same_split = paper.get("split") == results["split"]
        row = [f"{paper[k]:.2f}" if k in paper else "-" for k in ("accuracy", "precision", "recall", "f1")]
        t.add_row(f"paper ({'dev' if same_split else paper.get('split', 'split unstated')})", *row)
        if task.name == "qqp":
            notes.append("the paper's row is Table 3 (BERT-E-L, 70 layers, GLUE QQP dev, one run); it compares "
                         "only if --data-dir holds GLUE QQP's own dev split")
            notes.append("Table 1's leaderboard figures are GLUE *test* scores: not comparable with a dev score")
        else:
            notes.append("the paper does not say which split its 65.86% TNEWS accuracy is on, and sets it beside "
                         "ALBERT-xxlarge's 59.46%, a CLUE *test* score: neither compares like for like")
    pos_rate = None
    if task.positive_label is not None:
        support = results["per_class"][task.positive_label]["support"]
        pos_rate = support / max(1, results["n_examples"])
        notes.append(f"class {task.positive_label} is {100 * pos_rate:.1f}% of this dev set (GLUE QQP's: about 37%)")
    if audit and "dev" in audit["splits"] and "also_in_train_normalised" in audit["splits"]["dev"]:
        dv = audit["splits"]["dev"]
        notes.append(f"audit: {dv['also_in_train_normalised']['count']:,} dev {audit['unit']}s "
                     f"({100 * dv['also_in_train_normalised']['share']:.1f}%) also occur in train (normalised; exact: "
                     f"{dv['also_in_train_exact']['count']:,}); majority class share {100 * (dv['majority_share'] or 0):.1f}%")
    console().print(t)
    for n in notes:
        info(f"  note: {n}")
    info(f"  data: {data_dir}; results in results.json")


# ------------------------------------------------------------------ commands


def _resolve(task: str, preset, overrides, epochs, max_steps, seed) -> FinetuneRecipe:
    sets = list(overrides or [])
    for key, value in (("train.epochs", epochs), ("train.max_steps", max_steps), ("train.seed", seed)):
        if value is not None:
            sets.append(f"{key}={value}")
    return load_recipe(task, preset=preset, overrides=sets, kind="finetune")


def finetune(task: str, *, init: Path, data_dir: Path | None, out: Path | None = None, preset: str | None = None,
             overrides: list[str] | None = None, max_steps: int | None = None, epochs: float | None = None,
             seed: int | None = None, resume: str = "auto", with_floors: bool = True) -> int:
    from fpm.engine.distributed import init as dist_init
    from fpm.engine.distributed import resolve_env, teardown
    from fpm.engine.signals import install_early, uninstall

    install_early()
    try:
        recipe = _resolve(task, preset, overrides, epochs, max_steps, seed)
        out = Path(out) if out else Path("runs") / f"finetune-{recipe.task.name}"
        dist = resolve_env()
        with RunLock(out, "fpm finetune " + task) if dist.rank == 0 else contextlib.nullcontext():
            dist_init(dist)
            try:
                return _finetune(recipe, Path(init), data_dir, out, dist, resume, with_floors)
            finally:
                teardown()
    finally:
        uninstall()  # from here on the process only exits: SIGTERM kills it again


def _report_bad(split: Split) -> None:
    if split.bad:
        kinds = ", ".join(f"{v} {k} (lines {', '.join(map(str, split.bad_lines[k][:5]))}"
                          f"{'…' if len(split.bad_lines[k]) > 5 else ''})" for k, v in split.bad.items())
        warn(f"{split.path}: skipped {sum(split.bad.values())} of {split.rows} rows: {kinds}")


def _finetune(recipe: FinetuneRecipe, init_path: Path, data_dir: Path | None, out: Path, dist, resume: str,
              with_floors: bool = True) -> int:
    from fpm.engine.distributed import barrier
    from fpm.engine.spec import finetuning_spec
    from fpm.engine.trainer import Trainer, check_precision, seed_everything
    from fpm.models.objective import Objective

    t = recipe.train
    rank0 = dist.rank == 0
    check_precision(t.precision)
    if recipe.deepspeed.zero_stage == 3:
        raise FpmError("fine-tuning supports ZeRO stages 0-2 (the best model is saved from whole weights)")
    splits = {name: load_split(recipe.task, data_dir, name, required=name != "test")
              for name in ("train", "dev", "test")}
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for s in splits.values():
            if s is not None:
                _report_bad(s)
        RunDir(out).recipe.write_text(dump_recipe(recipe))
    barrier()
    seed_everything(t.seed)
    init = load_init(init_path, recipe)
    feats = {name: init.encoder.encode(s.examples) for name, s in splits.items() if s is not None}
    train = splits["train"]
    labels = np.asarray([e.label for e in train.examples], dtype=np.int64)
    dataset = TaskDataset(feats["train"], labels, t.seed)
    steps = t.max_steps or max(1, math.ceil(t.epochs * len(train.examples) / t.batch_size))
    if t.batch_size % dist.world_size:
        raise FpmError(f"train.batch_size={t.batch_size} is not divisible by {dist.world_size} processes")
    spec = finetuning_spec(recipe, dist.world_size, steps)
    task = recipe.task
    positive = task.labels.index(task.positive_label) if task.positive_label is not None else None
    dev = splits["dev"]
    dev_y = [e.label for e in dev.examples]
    best_file = out / "best.json"
    state = {"trainer": None}

    def evaluate(step: int) -> dict:
        model = state["trainer"].model  # the engine's module's model: on the training device
        probs = predict(model, feats["dev"])
        m = classification_metrics(dev_y, probs.argmax(1).tolist(), task.num_labels, positive)
        value = m["macro_f1"] if task.metric == "macro_f1" else m[task.metric]
        best = json.loads(best_file.read_text()) if best_file.is_file() else None
        if rank0 and (best is None or value > best["value"]):
            save_model(model, out / "best", init)
            best_file.write_text(json.dumps({"step": step, "metric": task.metric, "value": value}))
        barrier()
        return {"eval_step": step, f"dev_{task.metric}": value, "dev_accuracy": m["accuracy"], "dev_f1": m["f1"]}

    trainer = Trainer(spec, Objective(init.model, classification_loss), dataset, out, dist,
                      resume=resume == "auto", on_step=evaluate, on_step_every=t.eval_every)
    state["trainer"] = trainer
    if rank0:
        info(f"fine-tuning {init.source} on {task.name} ({len(train.examples):,} train, {len(dev.examples):,} dev"
             f"{', ' + format(len(splits['test'].examples), ',') + ' test' if splits['test'] else ''}): {steps} steps "
             f"of {t.batch_size}, input {' + '.join(task.fields)}")
    result = trainer.fit()
    if result.reason != "done":
        return result.exit_code
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    if best is None or best["step"] != result.step and result.step % t.eval_every:
        evaluate(result.step)  # the last step is a candidate too
        best = json.loads(best_file.read_text())
    from transformers import AutoModelForSequenceClassification

    from fpm.engine.distributed import device_for

    # the best model scores dev and test on the training device, every rank a share of the rows
    model = AutoModelForSequenceClassification.from_pretrained(str(out / "best")).to(device_for(dist.local_rank))
    dev_probs = predict(model.eval(), feats["dev"])
    test_probs = predict(model, feats["test"]) if splits["test"] is not None else None
    if rank0:
        names = tnews_label_names(Path(data_dir)) if task.name == "tnews" else {}
        extra = {"model": str(out / "best"), "init": init.source, "best_step": best["step"], "steps": result.step,
                 "device": str(next(model.parameters()).device)}
        results = write_results(out, recipe, dev, dev_probs, extra, names)
        if test_probs is not None:
            write_results(out, recipe, splits["test"], test_probs, extra, names)
            info(f"test: wrote the submission file in {out} (test labels are not public: no score)")
        from fpm.audit import audit_splits
        from fpm.baseline import floors as compute_floors

        aud = audit_splits(task, {k: v for k, v in splits.items() if v is not None})
        (out / "audit.json").write_text(json.dumps(aud, indent=1, ensure_ascii=False))
        floor = compute_floors(task, {k: v for k, v in splits.items()}, out / "floors", names) if with_floors else None
        results["floors"] = floor
        results["audit"] = {"dev_also_in_train_normalised": aud["splits"]["dev"]["also_in_train_normalised"]["count"],
                            "dev_also_in_train_exact": aud["splits"]["dev"]["also_in_train_exact"]["count"],
                            "dev_majority_share": aud["splits"]["dev"]["majority_share"]}
        write_json(RunDir(out).results, results)
        summary(results, recipe, Path(data_dir), floor, aud)
    barrier()
    return 0


def evaluate_command(task: str, *, model_path: Path, data_dir: Path | None, split: str, out: Path | None,
                     preset: str | None = None, overrides: list[str] | None = None) -> dict | None:
    """Evaluate (dev) or predict (test) with a fine-tuned classifier, without training."""
    if split not in ("dev", "test", "train"):
        raise FpmError(f"--split must be dev or test, not {split!r}")
    recipe = _resolve(task, preset, overrides, None, None, None)
    model_path = Path(model_path)
    if (model_path / "best" / "config.json").is_file():
        model_path = model_path / "best"
    check_classifier(model_path, recipe.task.num_labels)
    init = load_init(model_path, recipe)
    data = load_split(recipe.task, data_dir, split)
    _report_bad(data)
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
