"""`fpm export RUN_DIR --out HF_DIR`: a checkpoint → a standard Hugging Face folder.

ZeRO partitions are consolidated into full fp32 weights (:mod:`fpm.runs`). The result is
``config.json`` + ``model.safetensors`` that plain ``transformers`` loads with ``from_pretrained`` —
no fpm needed — plus the tokenizer: a ``tokenizer.json`` for vocabularies ``tokenizers`` can
express (BERT WordPiece with its [CLS]/[SEP] template, GPT-2 BPE, vocabularies fpm trained), and
fpm's own tokenizer folder under ``fpm_tokenizer/`` for CPM/CPM-2 vocabularies, whose jieba
pre-segmentation has no ``tokenizers`` equivalent.
"""

from __future__ import annotations

from pathlib import Path

from fpm.console import info
from fpm.runs import export_run


def export(run_dir: Path, out: Path, tag: str | None = None) -> Path:
    recipe, folder, n = export_run(run_dir, out, tag)
    info(f"exported {folder} ({recipe.name}, {n:,} parameters) to {out}")
    return Path(out)


