"""The classifier fine-tuning starts from and leaves behind: loaded from an fpm run directory (or
one of its checkpoints) or a Hugging Face folder, with its pair encoder and tokenizer; its loss;
saved as a Hugging Face folder; and checked before `fpm evaluate` scores it."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fpm.config.schema import FinetuneRecipe
from fpm.data.pairs import PairEncoder
from fpm.errors import FpmError
from fpm.rundir import RunDir


@dataclass
class Init:
    model: torch.nn.Module
    encoder: PairEncoder
    source: str
    fpm_tokenizer: object | None
    hf_tokenizer: object | None


def classifier_from_pretraining(pre, num_labels: int, dropout: float):
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


def load_init(path: Path, recipe: FinetuneRecipe, from_scratch: bool = False) -> Init:
    """An encoder to fine-tune: an fpm run directory or checkpoint, or a Hugging Face model folder.
    ``from_scratch``: the same architecture and tokenizer with freshly initialised weights (the
    control that shows what pretraining adds; fpm's initialisation for fpm runs, the model class's
    own for Hugging Face folders)."""
    path = Path(path)
    num_labels, L = recipe.task.num_labels, recipe.train.max_seq_len
    if not path.exists():
        raise FpmError(f"--init {path}: not found")
    run_dir, tag = path, None
    if path.parent.name == "checkpoints" and path.name.startswith("step-"):
        run_dir, tag = path.parent.parent, path.name
    if RunDir(run_dir).is_pretraining_run():
        from fpm.runs import load_run_model

        pre_recipe, pre, tok, folder = load_run_model(run_dir, tag)
        if pre_recipe.model.family != "bert":
            raise FpmError(f"--init {path}: a {pre_recipe.model.family} model; fine-tuning classifies with BERT encoders")
        if L > pre_recipe.model.max_positions:
            raise FpmError(f"train.max_seq_len={L} exceeds the model's {pre_recipe.model.max_positions} positions")
        if from_scratch:
            from fpm.models import build_model

            pre = build_model(pre_recipe.model, pre_recipe.tokenizer.vocab_size, pad_id=tok.specials.pad)
            folder = f"{folder} (from scratch)"
        model = classifier_from_pretraining(pre, num_labels, recipe.train.dropout)
        return Init(model, PairEncoder(L, fpm_tokenizer=tok), f"{folder}", tok, None)
    if (path / "config.json").is_file():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        fpm_tok = None
        if (path / "fpm_tokenizer").is_dir():
            from fpm.data.tokenizers import load_tokenizer_path

            meta = json.loads((path / "fpm_tokenizer" / "fpm_tokenizer.json").read_text())
            fpm_tok = load_tokenizer_path(meta["kind"], path / "fpm_tokenizer")
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(path), num_labels=num_labels)
            if hasattr(config, "hidden_dropout_prob"):  # the recipe's dropout, as the run-directory path sets it
                config.hidden_dropout_prob = recipe.train.dropout
            model = (AutoModelForSequenceClassification.from_config(config) if from_scratch else
                     AutoModelForSequenceClassification.from_pretrained(str(path), config=config))
            hf_tok = None if fpm_tok is not None else AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise FpmError(f"--init {path}: cannot load a sequence-classification model ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]})") from None
        from fpm.models.bert import use_sdpa

        use_sdpa(model)  # an exported fpm BERT (MegatronBert) gets fpm's attention, as a run directory does
        encoder = PairEncoder(L, fpm_tokenizer=fpm_tok) if fpm_tok else PairEncoder(L, hf_tokenizer=hf_tok)
        return Init(model, encoder, str(path) + (" (from scratch)" if from_scratch else ""), fpm_tok, hf_tok)
    raise FpmError(f"--init {path}: neither an fpm run directory/checkpoint nor a Hugging Face model folder")


def encoder_shape(path: Path, num_labels: int) -> tuple[int, int, int, int, int] | None:
    """(parameters, largest layer's parameters, layers, hidden size, heads) of the classifier
    ``load_init`` would build from ``path``, from its configuration alone (the model built on the
    meta device: no weights read) — what the launch check needs; ``None`` when ``path`` is not
    something ``load_init`` reads (it reports that itself)."""
    path = Path(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" and path.name.startswith("step-") else path
    try:
        with torch.device("meta"):
            if RunDir(run_dir).is_pretraining_run():
                from fpm.config import load_resolved
                from fpm.models import build_model

                pre = load_resolved(RunDir(run_dir).recipe)
                m = pre.model
                model = build_model(m, pre.tokenizer.vocab_size, init=False)
                layers, h, heads = m.n_layers, m.d_model, m.n_heads
            elif (path / "config.json").is_file():
                from transformers import AutoConfig, AutoModelForSequenceClassification

                config = AutoConfig.from_pretrained(str(path), num_labels=num_labels)
                model = AutoModelForSequenceClassification.from_config(config)
                layers, h, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
            else:
                return None
    except Exception:  # an unreadable configuration: load_init says what is wrong with it
        return None
    from fpm.engine.memory import param_stats

    return (*param_stats(model), layers, h, heads)


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
        from fpm.runs import export_tokenizer

        export_tokenizer(init.fpm_tokenizer, tmp)
    elif init.hf_tokenizer is not None:
        init.hf_tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
