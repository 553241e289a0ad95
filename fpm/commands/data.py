"""`fpm data prepare`, `verify`, `train-tokenizer`, `audit` and `fetch-task`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from fpm.config import load_recipe
from fpm.console import console, info
from fpm.data.prepare import PrepareOptions, prepare
from fpm.data.tokenizers import train_tokenizer
from fpm.eval.audit import audit
from fpm.rundir import AUDIT
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


def show_audit(report: dict) -> None:
    t = Table(title=f"{report['task']} audit (unit: {report['unit']}; input {' + '.join(report['fields'])})")
    t.add_column("")
    names = list(report["splits"])
    for n in names:
        t.add_column(n, justify="right")
    s = report["splits"]

    def row(label, fn):
        t.add_row(label, *[fn(s[n]) for n in names])

    row("rows / examples", lambda x: f"{x['rows']:,} / {x['examples']:,}")
    row("bad rows", lambda x: ", ".join(f"{k} {v}" for k, v in x["bad_rows"].items()) or "0")
    row("labels", lambda x: " ".join(f"{k}:{v}" for k, v in x["labels"].items()) or "(none)")
    row("majority share", lambda x: f"{100 * x['majority_share']:.1f}%" if x["majority_share"] else "-")
    for f in report["fields"]:
        row(f"{f} length ({report['length_unit']}) mean/p95/max",
            lambda x, f=f: f"{x[f'length_{f}']['mean']:.1f} / {x[f'length_{f}']['p95']:.0f} / {x[f'length_{f}']['max']}")
        row(f"empty {f}", lambda x, f=f: str(x["empty_fields"].get(f, 0)))
    row("repeated within (exact / normalised)",
        lambda x: f"{x['duplicates_within_exact']['count']:,} / {x['duplicates_within_normalised']['count']:,}")
    row("also in train (exact / normalised)",
        lambda x: (f"{x['also_in_train_exact']['count']:,} ({100 * x['also_in_train_exact']['share']:.1f}%) / "
                   f"{x['also_in_train_normalised']['count']:,} ({100 * x['also_in_train_normalised']['share']:.1f}%)")
        if "also_in_train_exact" in x else "-")
    console().print(t)
    for n in names:
        ex = s[n].get("also_in_train_normalised", {}).get("examples")
        if ex:
            console().print(f"  {n} example also in train: line {ex[0]['line']}: {' | '.join(ex[0]['texts'])[:150]}",
                            highlight=False, markup=False)


def audit_command(task_name: str, data_dir: Path | None, out: Path | None, overrides: list[str]) -> dict:
    task = load_recipe(task_name, overrides=overrides, kind="finetune").task
    report = audit(task, data_dir)
    show_audit(report)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / AUDIT).write_text(json.dumps(report, indent=1, ensure_ascii=False))
        info(f"wrote {out / 'audit.json'}")
    return report


def fetch_task_command(task_name: str, out: Path) -> None:
    """`fpm data fetch-task TASK --out DIR`: the task from the Hugging Face Hub in its official layout."""
    from fpm.data.tasks import fetch_task

    fetch_task(load_recipe(task_name, kind="finetune").task, out)
