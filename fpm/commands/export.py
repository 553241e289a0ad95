"""`fpm export RUN_DIR --out HF_DIR`: a checkpoint → a standard Hugging Face folder.

ZeRO partitions are consolidated into full fp32 weights (:mod:`fpm.runs`). The result is
``config.json`` + ``model.safetensors`` that plain ``transformers`` loads with ``from_pretrained`` —
no fpm needed — plus the tokenizer: a ``tokenizer.json`` for vocabularies ``tokenizers`` can
express (BERT WordPiece with its [CLS]/[SEP] template, GPT-2 BPE, vocabularies fpm trained), and
fpm's own tokenizer folder under ``fpm_tokenizer/`` for CPM/CPM-2 vocabularies, whose jieba
pre-segmentation has no ``tokenizers`` equivalent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fpm.console import info, warn
from fpm.errors import FpmError
from fpm.rundir import RunDir
from fpm.runs import export_tokenizer, load_run_model


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
