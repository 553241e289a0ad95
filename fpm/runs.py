"""A trained run → its recipe, weights, model and tokenizer.

What `fpm export`, `fpm generate`, `fpm evaluate` and `fpm finetune --init` read from a pretraining
run directory (and the export itself, :func:`export_run`): the resolved ``recipe.yaml``, the newest intact checkpoint (or a named one)
consolidated into full fp32 weights (:mod:`fpm.engine.consolidate`), the model those weights fit,
and the run's own copy of its vocabulary (and that vocabulary written as a Hugging Face tokenizer).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fpm.config import load_resolved
from fpm.console import info, warn
from fpm.engine import checkpoint as ckpt
from fpm.engine.consolidate import consolidated_state_dict
from fpm.errors import FpmError
from fpm.rundir import RunDir, read_json


def load_run_model(run_dir: Path, tag: str | None = None):
    """(recipe, model with the checkpoint's weights, tokenizer, checkpoint folder) of a run."""
    from fpm.models import build_model

    run_dir = Path(run_dir)
    recipe_file = RunDir(run_dir).recipe
    if not recipe_file.is_file():
        raise FpmError(f"{run_dir}: not an fpm run directory (no recipe.yaml)")
    recipe = load_resolved(recipe_file)
    if tag:
        folder = RunDir(run_dir).checkpoints / tag
        if not folder.is_dir():
            have = ckpt.complete_tags(RunDir(run_dir).checkpoints)
            raise FpmError(f"{folder}: no such checkpoint (complete ones: {', '.join(have) if have else 'none'})")
        problem = ckpt.verify(folder)
        if problem:
            raise FpmError(f"{folder}: {problem}")
    else:
        found = ckpt.find_resumable(RunDir(run_dir).checkpoints)
        if found is None:
            raise FpmError(f"{run_dir}: no complete checkpoint to export")
        folder = found[0]
    tok = run_tokenizer(run_dir)
    sp = tok.specials
    model = build_model(recipe.model, recipe.tokenizer.vocab_size, init=False, pad_id=sp.pad, eos_id=sp.eos or sp.eod)
    state = consolidated_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise FpmError(f"{folder}: weights do not fit the recipe's model (missing {sorted(set(missing) - tied)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return recipe, model.eval(), tok, folder


def run_tokenizer(run_dir: Path):
    """The vocabulary a pretraining run trained with: its own copy (``tokenizer/``, checked against
    ``data_manifest.json``), whatever the working directory and wherever the run has moved. Runs
    written before fpm copied it are read through the data folder run.json names."""
    from fpm.data.datasets import checked_tokenizer, tokenizer_of
    from fpm.data.shards import ShardSet

    rd = RunDir(run_dir)
    manifest = read_json(rd.data_manifest)
    if manifest is not None and rd.tokenizer.is_dir():
        return checked_tokenizer(manifest, rd.tokenizer, rd.data_manifest)
    data = rd.status().get("data")
    if not data:
        raise FpmError(f"{run_dir}: no {rd.tokenizer.name}/ and no data folder in {rd.run_json.name}: the "
                       "vocabulary of this run is unknown")
    data_dir = Path(data) if Path(data).is_absolute() else run_dir / data
    return tokenizer_of(ShardSet(data_dir))


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return any(key == k or key.endswith(k) for k in keys) or key.endswith(("decoder.weight", "lm_head.weight"))


def export_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from fpm.data.tokenizers import HFTokenizer

    tok.save(out / "fpm_tokenizer")
    if not isinstance(tok, HFTokenizer) or tok.kind in ("unigram", "cpm2"):
        info(f"tokenizer: {tok.kind} vocabularies need jieba pre-segmentation; saved fpm's folder in {out / 'fpm_tokenizer'}")
        return
    backend = tok.backend
    if tok.kind == "wordpiece":
        from tokenizers import Tokenizer as TkTokenizer
        from tokenizers.processors import TemplateProcessing

        backend = TkTokenizer.from_str(backend.to_str())
        cls, sep = tok.specials.cls, tok.specials.sep
        backend.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                    special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       do_lower_case=tok.lowercase,
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(str(out))


def usual_modes(folder: Path) -> None:
    """Give every exported file the mode a new file gets under the user's umask (0644 under the
    usual 022): some writers create theirs with mkstemp, i.e. 0600, which other users cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def export_run(run_dir: Path, out: Path, tag: str | None = None):
    """A run's checkpoint (``tag``, default the newest intact one) as a Hugging Face folder ``out``
    (see `fpm export`); (recipe, checkpoint folder, parameter count)."""
    recipe, model, tok, folder = load_run_model(run_dir, tag)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FpmError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    try:
        export_tokenizer(tok, out)
    except Exception as exc:  # the weights are the export; a tokenizer problem must not lose them
        warn(f"tokenizer export failed ({type(exc).__name__}: {exc}); fpm's tokenizer folder is in {out / 'fpm_tokenizer'}")
    shutil.copyfile(RunDir(run_dir).recipe, out / "fpm_recipe.yaml")
    usual_modes(out)
    return recipe, folder, sum(p.numel() for p in model.parameters())
