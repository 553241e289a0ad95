"""`fpm data prepare` and `fpm data train-tokenizer`."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from fpm.config import load_recipe
from fpm.console import console, info
from fpm.data.prepare import PrepareOptions, prepare
from fpm.data.tokenizers import train_tokenizer
from fpm.runlock import RunLock


def prepare_command(recipe_name: str, inputs: list[Path], out: Path, *, preset: str | None, overrides: list[str],
                    fmt: str, text_mode: str, text_field: str, workers: int, shard_tokens: int,
                    validation: float = 0.0, validation_inputs: list[Path] = (), validation_tokens: int = 0) -> dict:
    recipe = load_recipe(recipe_name, preset=preset, overrides=overrides, kind="pretrain")
    t0 = time.perf_counter()
    with RunLock(out, "fpm data prepare " + recipe_name):
        manifest = prepare(recipe, PrepareOptions(inputs=inputs, out=out, fmt=fmt, text_mode=text_mode,
                                                  text_field=text_field, workers=workers, shard_tokens=shard_tokens,
                                                  validation=validation, validation_inputs=validation_inputs,
                                                  validation_tokens=validation_tokens))
    elapsed = time.perf_counter() - t0
    table = Table(title=f"{out}: {manifest['n_tokens']:,} tokens, {manifest['n_docs']:,} documents, "
                        f"{len(manifest['shards'])} shard(s)")
    for col in ("source", "format", "records", "documents", "bad records"):
        table.add_column(col, justify="left" if col in ("source", "format", "bad records") else "right")
    for s in manifest["sources"]:
        bad = ", ".join(f"{k} {v}" for k, v in s["bad"].items()) or "none"
        table.add_row(s["path"], s["format"], f"{s['records']:,}", f"{s['documents']:,}", bad)
    console().print(table)
    if val := manifest.get("validation"):
        info(f"validation part: {val['n_tokens']:,} tokens, {val['n_docs']:,} documents, {len(val['shards'])} shard(s)")
    if manifest["bad_records"]:
        info(f"[yellow]{manifest['bad_records']:,} bad records skipped[/yellow] (counted per file in {out}/manifest.json)")
    info(f"done in {elapsed:.1f}s ({manifest['n_tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)")
    return manifest


def train_tokenizer_command(kind: str, inputs: list[Path], vocab_size: int, out: Path, lowercase: bool,
                            language: str) -> None:
    from fpm.data.readers import check_text_input

    for p in inputs:
        check_text_input(p)  # empty or binary: an error, not a vocabulary of reserved tokens
    tok, reserved = train_tokenizer(kind, inputs, vocab_size, out, lowercase=lowercase, language=language)
    info(f"wrote a {kind} vocabulary of {tok.vocab_size:,} tokens to {out} (hash {tok.vocab_hash()})")
    if reserved:
        info(f"the corpus yielded {vocab_size - reserved:,} pieces; {reserved:,} reserved \\[unusedN] tokens fill the rest")


def verify_command(folder: Path) -> None:
    """`fpm data verify DIR`: every shard file against the manifest's sizes and checksums."""
    from fpm.console import warn
    from fpm.data.shards import verify_folder
    from fpm.errors import FpmError

    checked, problems = verify_folder(folder)
    damaged = [p for p in problems if "no checksums in the manifest" not in p]
    for p in problems:
        warn(p)
    if damaged:
        raise FpmError(f"{folder}: {len(damaged)} damaged file(s), the first {damaged[0]}; prepare the folder again")
    info(f"{folder}: intact ({checked} files match their checksums)")
