"""`fpm data prepare`: corpus files → tokenized, memory-mapped binary shards + manifest.

Streaming all the way: documents are read lazily, tokenized in worker processes a chunk at a time
(never more than ``2 × workers`` chunks in flight), and appended to the current shard; memory stays
flat whatever the input size. A shard is written under temporary names and renamed when complete;
``progress.json`` then records how many input records the finished shards cover, so an interrupted
run resumes after the last finished shard and a finished one is skipped.

Per family: BERT documents are split into sentences and every token gets a word-start flag (for
whole-word masking and sentence-order pairs); GPT and T5 documents are token streams with an
end-of-document token appended.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import chain
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fpm.console import Progress, info, warn
from fpm.data import shards as sh
from fpm.data.assemble import HELD_OUT_RULE, PROGRESS, ShardAssembler, fraction_for_tokens, held_out
from fpm.data.readers import Reader, check_text_input, split_sentences
from fpm.data.tokenizers import META_FILE, Tokenizer, load_tokenizer, load_tokenizer_path, train_tokenizer
from fpm.errors import FpmError
from fpm.rundir import write_json

TOKENIZER_DIR = "tokenizer"
CHUNK_CHARS = 1 << 18
CHUNK_DOCS = 1024


@dataclass
class PrepareOptions:
    inputs: Sequence[Path]
    out: Path
    fmt: str = "auto"
    text_mode: str = "line"
    text_field: str = "text"
    workers: int = max(1, (os.cpu_count() or 1))
    shard_tokens: int = 1 << 27
    max_chunks: int | None = None  # stop after this many chunks (tests: simulate an interruption)
    quiet: bool = False
    validation: float = 0.0  # share of documents held out for validation, chosen by hash (assemble.held_out)
    validation_inputs: Sequence[Path] = ()  # files held out whole for validation
    validation_tokens: int = 0  # instead of a share: about this many tokens, documents chosen by hash

    @property
    def all_inputs(self) -> list[Path]:
        return [*self.inputs, *self.validation_inputs]


# ------------------------------------------------------------------ worker side

_TOK: Tokenizer | None = None
_MODE: tuple[str, str] = ("clm", "en")


def _init_worker(tok_dir: str, kind: str, lowercase: bool, language: str, objective: str) -> None:
    global _TOK, _MODE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOK = load_tokenizer_path(kind, tok_dir, lowercase, language)
    _MODE = (objective, language)


def _encode_chunk(texts: list[str]) -> dict:
    """Tokenize a chunk of documents into flat arrays (runs in a worker process).

    ``doc_lens`` has one entry per input document (0 when nothing was left after tokenization);
    for BERT, ``sents_per_doc``/``sent_lens`` describe the sentences and ``word_starts`` flags tokens.
    """
    assert _TOK is not None
    objective, language = _MODE
    if objective == "mlm_sop":
        per_doc, flat = [], []
        for text in texts:
            s = split_sentences(text, language)
            per_doc.append(len(s))
            flat.extend(s)
        tokens, starts, sent_len = _TOK.encode_words(flat)
        doc_of_sent = np.repeat(np.arange(len(per_doc)), per_doc)
        doc_lens = np.bincount(doc_of_sent, weights=sent_len, minlength=len(per_doc)).astype(np.int64)
        nonempty = sent_len > 0
        sents_per_doc = np.bincount(doc_of_sent[nonempty], minlength=len(per_doc)).astype(np.int64)
        return {"tokens": tokens, "doc_lens": doc_lens, "sent_lens": sent_len[nonempty],
                "sents_per_doc": sents_per_doc, "word_starts": starts}
    eod = [_TOK.specials.eod]
    encoded = _TOK.encode_batch(texts)
    doc_lens = np.fromiter((len(ids) + 1 if ids else 0 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter(chain.from_iterable((ids + eod) if ids else ids for ids in encoded), dtype=np.int64,
                         count=int(doc_lens.sum()))
    return {"tokens": tokens, "doc_lens": doc_lens}


# ------------------------------------------------------------------ main side


def _config_key(recipe, tok: Tokenizer, opts: PrepareOptions) -> str:
    h = hashlib.sha256()
    parts = [recipe.model.family, recipe.data.objective, recipe.language, tok.kind, tok.vocab_hash(),
             opts.fmt, opts.text_mode, opts.text_field, str(opts.shard_tokens)]
    for p in opts.inputs:
        st = Path(p).stat()
        parts += [str(Path(p).resolve()), str(st.st_size)]
    if opts.validation or opts.validation_inputs:  # (absent before validation parts existed: same keys)
        parts += [f"validation={opts.validation!r}"]
        for p in opts.validation_inputs:
            parts += [str(Path(p).resolve()), str(Path(p).stat().st_size)]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:16]


def _chunks(readers: list[Reader], skip: int) -> Iterator[tuple[int, list[str], list[int], int]]:
    """(reader index, documents, record number of each document, records consumed at the chunk's end).

    Chunks never span two files. The first ``skip`` records (already in finished shards) are read
    and counted but not returned.
    """
    consumed = 0
    for ri, reader in enumerate(readers):
        docs: list[str] = []
        where: list[int] = []
        chars = 0
        for doc in reader:
            consumed += 1
            if consumed <= skip:
                continue
            if doc is not None:
                docs.append(doc)
                where.append(consumed)
                chars += len(doc)
            if chars >= CHUNK_CHARS or len(docs) >= CHUNK_DOCS:
                yield ri, docs, where, consumed
                docs, where, chars = [], [], 0
        if docs or consumed > skip:
            yield ri, docs, where, consumed


def _obtain_tokenizer(recipe, opts: PrepareOptions) -> Tokenizer:
    tok_dir = opts.out / TOKENIZER_DIR
    cfg = recipe.tokenizer
    if cfg.train and not cfg.path:
        if (tok_dir / META_FILE).is_file():
            return load_tokenizer(cfg, recipe.language, trained_dir=tok_dir)
        if not opts.quiet:
            info(f"training a {cfg.kind} vocabulary of {cfg.vocab_size} on the input")

        def texts():
            for p in opts.inputs:
                for doc in Reader(p, opts.fmt, opts.text_mode, opts.text_field):
                    if doc is not None:
                        yield doc

        tok, reserved = train_tokenizer(cfg.kind, None, cfg.vocab_size, tok_dir, texts=texts(),
                                        lowercase=cfg.lowercase, language=recipe.language)
        if reserved and not opts.quiet:
            info(f"the corpus yielded {cfg.vocab_size - reserved} pieces; {reserved} reserved \\[unusedN] tokens fill the vocabulary")
        return tok
    tok = load_tokenizer(cfg, recipe.language)
    if not (tok_dir / META_FILE).is_file():
        tok.save(tok_dir)
    return tok


def _fraction_for(opts: PrepareOptions, tok: Tokenizer) -> float:
    """``--validation-tokens``: the hash fraction that holds out about that many tokens."""
    texts = (doc for p in opts.inputs for doc in Reader(p, opts.fmt, opts.text_mode, opts.text_field) if doc is not None)
    try:
        fraction = fraction_for_tokens(texts, opts.validation_tokens, tok.encode_batch)
    except ValueError as exc:
        raise FpmError(f"--validation-tokens {opts.validation_tokens}: {exc}") from None
    if not opts.quiet:
        info(f"holding out about {opts.validation_tokens:,} tokens: documents with a text hash below {fraction:.6f} x 2^64")
    return fraction


def _nonempty_inputs(opts: PrepareOptions) -> None:
    """Refuse when every input is empty; warn about (and skip) the empty ones otherwise."""
    if not opts.inputs:
        raise FpmError("no input files given (--input FILE ...)")
    empty = []
    for p in opts.inputs:
        try:
            check_text_input(Path(p), text_only=False)
        except FpmError as exc:
            if ": empty (" not in str(exc):
                raise
            empty.append(exc)
    if len(empty) == len(opts.inputs):
        raise empty[0]
    for exc in empty:
        warn(f"{exc}; skipped")
    if opts.validation_tokens < 0:
        raise FpmError(f"--validation-tokens {opts.validation_tokens}: a number of tokens, 0 or more")
    if not 0.0 <= opts.validation < 1.0:
        raise FpmError(f"--validation {opts.validation}: a share of the documents in [0, 1)")
    for p in opts.validation_inputs:
        check_text_input(Path(p), text_only=False)


def _resume_point(out: Path, key: str, quiet: bool) -> tuple[list[dict], int, dict[int, int], dict]:
    """(finished shards, records they cover, empty documents per input, the validation part's
    state) of an interrupted preparation of the same inputs and settings in ``out``; nothing when
    there is none."""
    progress_path = out / PROGRESS
    if not progress_path.is_file():
        return [], 0, {}, {}
    state = json.loads(progress_path.read_text())
    if state.get("config_key") != key:
        raise FpmError(f"{out}: holds an unfinished preparation of other inputs or settings; "
                       "choose another --out or delete it")
    if not quiet:
        info(f"resuming after {len(state['shards'])} finished shards ({state['records_done']:,} records)")
    return (state["shards"], state["records_done"], {int(k): v for k, v in state.get("empty_after", {}).items()},
            state.get("validation", {}))


def _encode_into(assembler: ShardAssembler, readers: list[Reader], skip: int, init_args: tuple,
                 opts: PrepareOptions) -> None:
    """Read, tokenize (in ``opts.workers`` processes, at most 2 chunks each in flight) and append
    every input record after the first ``skip`` to ``assembler``'s shards."""
    pool = None
    if opts.workers > 0:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ctx.Pool(opts.workers, initializer=_init_worker, initargs=init_args)
    else:
        _init_worker(*init_args)
    total_bytes = sum(Path(p).stat().st_size for p in opts.all_inputs)
    held_out_file = set(range(len(opts.inputs), len(opts.all_inputs)))
    val = assembler.validation

    def encode(docs: list[str]):
        return pool.apply_async(_encode_chunk, (docs,)) if pool is not None else _encode_chunk(docs)

    def result(fut) -> dict:
        return fut.get() if pool is not None else fut

    pending: deque = deque()
    bytes_seen = n_chunks = 0
    try:
        with Progress(None if opts.quiet else total_bytes, "prepare", quiet=opts.quiet,
                      fmt=lambda d, t: f"{d / 1e6:,.1f}/{t / 1e6:,.1f} MB") as bar:

            def drain(limit: int, bytes_seen: int) -> int:
                """Feed finished chunks in order until at most ``limit`` are in flight; returns the
                input bytes read so far (the progress bar's position)."""
                while len(pending) > limit:
                    ri, where, chunk_end, fut, held, held_chars = pending.popleft()
                    if val is None:
                        assembler.feed(ri, where, chunk_end, result(fut))
                    else:  # both parts up to the chunk's end, then (maybe) a finished training shard
                        assembler.feed(ri, where, chunk_end, result(fut), split=False)
                        if held is not None:
                            val.chars += held_chars
                            val.feed(ri, [], chunk_end, result(held), split=False)
                        assembler.finish_if_full(chunk_end)
                    now = sum(r.stats.bytes for r in readers[:ri]) + readers[ri].stats.bytes
                    bar.update(max(0, now - bytes_seen), tokens=f"{assembler.tokens:,}")
                    bytes_seen = max(bytes_seen, now)
                return bytes_seen

            for ri, docs, where, chunk_end in _chunks(readers, skip):
                if opts.max_chunks is not None and n_chunks >= opts.max_chunks:
                    raise KeyboardInterrupt  # simulated interruption (tests)
                n_chunks += 1
                held: list[str] = []
                if val is not None:  # whole documents to the validation part (in input order)
                    side = [ri in held_out_file or held_out(d, opts.validation) for d in docs]
                    held = [d for d, v in zip(docs, side) if v]
                    docs, where = [d for d, v in zip(docs, side) if not v], [w for w, v in zip(where, side) if not v]
                pending.append((ri, where, chunk_end, encode(docs), encode(held) if held else None,
                                sum(map(len, held))))
                bytes_seen = drain(2 * max(1, opts.workers), bytes_seen)
            drain(0, bytes_seen)
            assembler.close(sum(r.stats.records for r in readers))
    except BaseException as exc:
        assembler.abort()
        if pool is not None:
            pool.terminate()
        if isinstance(exc, OSError) and not exc.filename:  # a full disk names no file: name the folder
            raise OSError(exc.errno, exc.strerror, str(opts.out)) from None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def prepare(recipe, opts: PrepareOptions) -> dict:
    """Prepare ``opts.inputs`` for ``recipe``; returns the manifest (also written to ``out``)."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    _nonempty_inputs(opts)
    tok = _obtain_tokenizer(recipe, opts)
    if opts.validation_tokens:
        opts = replace(opts, validation=_fraction_for(opts, tok))
    key = _config_key(recipe, tok, opts)
    manifest_path = out / sh.MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("config_key") == key and manifest.get("complete"):
            if not opts.quiet:
                info(f"{out}: already prepared ({manifest['n_tokens']:,} tokens in {len(manifest['shards'])} shards)")
            return manifest
        raise FpmError(f"{out}: holds a different preparation; choose another --out or delete it")
    done_shards, skip, empty_after, val_state = _resume_point(out, key, opts.quiet)
    for stale in out.glob("*.tmp"):
        stale.unlink()

    objective = recipe.data.objective
    sentences = word_starts = objective == "mlm_sop"
    dtype = sh.token_dtype(tok.vocab_size)
    readers = [Reader(p, opts.fmt, opts.text_mode, opts.text_field) for p in opts.all_inputs]
    val = None
    if opts.validation or opts.validation_inputs:
        val_empty = {int(k): v for k, v in val_state.get("empty_after", {}).items()}
        val = ShardAssembler(out, key, dtype, sentences, word_starts, sys.maxsize, val_state.get("shards", []),
                             skip, val_empty, prefix="val")  # never finished by size: see ShardAssembler
        val.chars = val_state.get("chars", 0)
    assembler = ShardAssembler(out, key, dtype, sentences, word_starts, opts.shard_tokens, done_shards, skip,
                               empty_after, validation=val)
    init_args = (str(out / TOKENIZER_DIR), tok.kind, recipe.tokenizer.lowercase, recipe.language, objective)
    _encode_into(assembler, readers, skip, init_args, opts)
    shards = assembler.shards

    sources = []
    for ri, reader in enumerate(readers):
        stats = reader.stats
        empty = assembler.empty_after[ri] + (val.empty_after[ri] if val is not None else 0)
        if empty:
            stats.bad["empty_after_tokenization"] += empty
            stats.documents -= empty
        sources.append({**stats.to_json(), **({"part": "validation"} if ri >= len(opts.inputs) else {})})
    if not shards:
        bad = ", ".join(f"{k} {v}" for src in sources for k, v in src["bad"].items()) or "none"
        raise FpmError(f"{', '.join(map(str, opts.inputs))}: no document to prepare "
                       f"({sum(src['records'] for src in sources)} records read, bad: {bad})")
    manifest = {
        "format": sh.FORMAT, "version": sh.VERSION, "complete": True, "config_key": key,
        "recipe": recipe.name, "family": recipe.model.family, "objective": objective, "language": recipe.language,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "vocab_hash": tok.vocab_hash(),
                      "dir": TOKENIZER_DIR},
        "dtype": dtype.name, "eod_id": tok.specials.eod, "sentences": sentences, "word_starts": word_starts,
        "input_format": opts.fmt, "text_mode": opts.text_mode,
        "shards": shards,
        "n_docs": sum(s["n_docs"] for s in shards), "n_sents": sum(s["n_sents"] for s in shards),
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "sources": sources,
        "bad_records": sum(sum(s["bad"].values()) for s in sources),
    }
    if val is not None:
        manifest["validation"] = {
            "fraction": opts.validation, "tokens_requested": opts.validation_tokens or None, "rule": HELD_OUT_RULE, "inputs": [str(p) for p in opts.validation_inputs],
            "shards": val.shards, "n_docs": sum(s["n_docs"] for s in val.shards),
            "n_sents": sum(s["n_sents"] for s in val.shards), "n_tokens": sum(s["n_tokens"] for s in val.shards),
            "n_chars": val.chars}
        if not val.shards and not opts.quiet:
            warn(f"{out}: no document fell into the validation part (--validation {opts.validation}); "
                 "hold out a larger share or give --validation-input")
    write_json(manifest_path, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest
