"""`fpm export RUN_DIR --out HF_DIR`: a checkpoint → a standard Hugging Face folder.

ZeRO partitions are consolidated into full fp32 weights with DeepSpeed's ``zero_to_fp32`` logic
(stage 0 checkpoints hold the whole module already). The result is ``config.json`` +
``model.safetensors`` that plain ``transformers`` loads with ``from_pretrained`` — no fpm needed —
plus the tokenizer: a ``tokenizer.json`` for vocabularies ``tokenizers`` can express (BERT
WordPiece with its [CLS]/[SEP] template, GPT-2 BPE, vocabularies fpm trained), and fpm's own
tokenizer folder under ``fpm_tokenizer/`` for CPM/CPM-2 vocabularies, whose jieba pre-segmentation
has no ``tokenizers`` equivalent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fpm.config import load_resolved
from fpm.console import info, warn
from fpm.engine import checkpoint as ckpt
from fpm.errors import FpmError
from fpm.models.objective import strip_prefix
from fpm.rundir import RunDir, read_json


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one checkpoint folder (``.../checkpoints/step-N``)."""
    zero_files = list(folder.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_files and _written_by_bf16_optimizer(zero_files[0]):
        state = _from_bf16_optimizer(folder, zero_files)
    elif zero_files:
        from fpm.engine.distributed import select_accelerator

        select_accelerator()
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        model_file = folder / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise FpmError(f"{folder}: no DeepSpeed model states found")
        state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in strip_prefix(state).items()}


def _written_by_bf16_optimizer(optim_file: Path) -> bool:
    """DeepSpeed's ZeRO optimizers record their stage; its BF16_Optimizer does not."""
    state = torch.load(optim_file, map_location="cpu", weights_only=False, mmap=True)
    return "zero_stage" not in state["optimizer_state_dict"]


def _from_bf16_optimizer(folder: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint written by DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1 with fp32
    gradient accumulation), which DeepSpeed's ``zero_to_fp32`` does not read: each rank holds an
    equal slice of every parameter group's flat fp32 master copy (the group's parameters in order,
    padding at the end); ``param_shapes`` in the model states names them."""
    def rank(f: Path) -> int:
        return int(f.name.split("pp_rank_")[1].split("_")[0])

    model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             ["single_partition_of_fp32_groups"] for f in sorted(files, key=rank)]
    state = dict(model["module"])  # buffers, and the names of tied parameters
    for g, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([p[g] for p in parts])
        offset = 0
        for name, shape in shapes.items():
            n = shape.numel()
            state[name] = flat[offset:offset + n].view(shape).clone()
            offset += n
    for name, source in (model.get("shared_params") or {}).items():
        state[name] = state[source]
    return state


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


def export(run_dir: Path, out: Path, tag: str | None = None) -> Path:
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
    info(f"exported {folder} ({recipe.name}, {sum(p.numel() for p in model.parameters()):,} parameters) to {out}")
    return out
