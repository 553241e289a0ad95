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
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from itertools import chain
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpm.console import Progress, info, warn
from fpm.data import shards as sh
from fpm.data.readers import Reader, check_text_input, split_sentences
from fpm.data.tokenizers import META_FILE, Tokenizer, load_tokenizer, load_tokenizer_path, train_tokenizer
from fpm.errors import FpmError

PROGRESS = "progress.json"
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
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:16]


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


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


class ShardAssembler:
    """Appends tokenized chunks to shards of ``shard_tokens`` tokens, finishing a shard at the
    document that fills it; after each finished shard, ``progress.json`` records the shards so far
    and how many input records they cover (what a resumed preparation skips)."""

    def __init__(self, out: Path, key: str, dtype, sentences: bool, word_starts: bool, shard_tokens: int,
                 done_shards: list[dict], records_done: int, empty_after: dict[int, int]):
        self.out, self.key, self.dtype = out, key, dtype
        self.sentences, self.word_starts, self.shard_tokens = sentences, word_starts, shard_tokens
        self.shards = list(done_shards)
        self.records_done = records_done
        self.empty_after = Counter(empty_after)  # per input: documents with no token left
        self.writer: sh.ShardWriter | None = None

    @property
    def tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards) + (self.writer.n_tokens if self.writer else 0)

    def _finish_shard(self, records: int) -> None:
        self.shards.append(self.writer.close())
        self.writer = None
        self.records_done = records
        _atomic_json(self.out / PROGRESS, {"config_key": self.key, "shards": self.shards,
                                           "records_done": records, "empty_after": dict(self.empty_after)})

    def feed(self, ri: int, where: list[int], chunk_end: int, res: dict) -> None:
        """Append a chunk's documents (input ``ri``; ``where``: each document's record number;
        ``chunk_end``: records consumed at the chunk's end)."""
        lens = res["doc_lens"]
        tok_off = np.concatenate([[0], np.cumsum(lens)])
        sent_off = sent_tok = None
        if self.sentences:
            sent_off = np.concatenate([[0], np.cumsum(res["sents_per_doc"])])
            sent_tok = np.concatenate([[0], np.cumsum(res["sent_lens"])])
        i, n = 0, len(lens)
        while i < n:
            if self.writer is None:
                self.writer = sh.ShardWriter(self.out, f"shard_{len(self.shards):05d}", self.dtype, self.sentences,
                                             self.word_starts)
            room = self.shard_tokens - self.writer.n_tokens
            # first document j at which the shard is full (or the chunk's last document)
            j = min(int(np.searchsorted(tok_off[i + 1:] - tok_off[i], room, side="left")) + i, n - 1)
            self.empty_after[ri] += int((lens[i:j + 1] == 0).sum())
            a, b = int(tok_off[i]), int(tok_off[j + 1])
            if b > a:
                kept = lens[i:j + 1][lens[i:j + 1] > 0]
                if self.sentences:
                    sa, sb = int(sent_off[i]), int(sent_off[j + 1])
                    self.writer.add(res["tokens"][a:b], kept, res["sent_lens"][sa:sb], res["word_starts"][a:b])
                    assert sent_tok[sb] - sent_tok[sa] == b - a
                else:
                    self.writer.add(res["tokens"][a:b], kept)
            if self.writer.n_tokens >= self.shard_tokens:
                self._finish_shard(where[j] if j < n - 1 else chunk_end)
            i = j + 1
        if n == 0 and self.writer is not None and self.writer.n_tokens >= self.shard_tokens:
            self._finish_shard(chunk_end)

    def close(self, records: int) -> None:
        """Finish the last, partly filled shard (``records``: every input record read)."""
        if self.writer is not None and self.writer.n_tokens:
            self._finish_shard(records)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()  # no half-written shard stays behind under a final name


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


def _resume_point(out: Path, key: str, quiet: bool) -> tuple[list[dict], int, dict[int, int]]:
    """(finished shards, records they cover, empty documents per input) of an interrupted
    preparation of the same inputs and settings in ``out``; nothing when there is none."""
    progress_path = out / PROGRESS
    if not progress_path.is_file():
        return [], 0, {}
    state = json.loads(progress_path.read_text())
    if state.get("config_key") != key:
        raise FpmError(f"{out}: holds an unfinished preparation of other inputs or settings; "
                       "choose another --out or delete it")
    if not quiet:
        info(f"resuming after {len(state['shards'])} finished shards ({state['records_done']:,} records)")
    return state["shards"], state["records_done"], {int(k): v for k, v in state.get("empty_after", {}).items()}


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
    total_bytes = sum(Path(p).stat().st_size for p in opts.inputs)
    pending: deque = deque()
    bytes_seen = n_chunks = 0
    try:
        with Progress(None if opts.quiet else total_bytes, "prepare", quiet=opts.quiet,
                      fmt=lambda d, t: f"{d / 1e6:,.1f}/{t / 1e6:,.1f} MB") as bar:

            def drain(limit: int, bytes_seen: int) -> int:
                """Feed finished chunks in order until at most ``limit`` are in flight; returns the
                input bytes read so far (the progress bar's position)."""
                while len(pending) > limit:
                    ri, where, chunk_end, fut = pending.popleft()
                    assembler.feed(ri, where, chunk_end, fut.get() if pool is not None else fut)
                    now = sum(r.stats.bytes for r in readers[:ri]) + readers[ri].stats.bytes
                    bar.update(max(0, now - bytes_seen), tokens=f"{assembler.tokens:,}")
                    bytes_seen = max(bytes_seen, now)
                return bytes_seen

            for ri, docs, where, chunk_end in _chunks(readers, skip):
                if opts.max_chunks is not None and n_chunks >= opts.max_chunks:
                    raise KeyboardInterrupt  # simulated interruption (tests)
                n_chunks += 1
                fut = pool.apply_async(_encode_chunk, (docs,)) if pool is not None else _encode_chunk(docs)
                pending.append((ri, where, chunk_end, fut))
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
    key = _config_key(recipe, tok, opts)
    manifest_path = out / sh.MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("config_key") == key and manifest.get("complete"):
            if not opts.quiet:
                info(f"{out}: already prepared ({manifest['n_tokens']:,} tokens in {len(manifest['shards'])} shards)")
            return manifest
        raise FpmError(f"{out}: holds a different preparation; choose another --out or delete it")
    done_shards, skip, empty_after = _resume_point(out, key, opts.quiet)
    for stale in out.glob("*.tmp"):
        stale.unlink()

    objective = recipe.data.objective
    sentences = word_starts = objective == "mlm_sop"
    dtype = sh.token_dtype(tok.vocab_size)
    readers = [Reader(p, opts.fmt, opts.text_mode, opts.text_field) for p in opts.inputs]
    assembler = ShardAssembler(out, key, dtype, sentences, word_starts, opts.shard_tokens, done_shards, skip,
                               empty_after)
    init_args = (str(out / TOKENIZER_DIR), tok.kind, recipe.tokenizer.lowercase, recipe.language, objective)
    _encode_into(assembler, readers, skip, init_args, opts)
    shards = assembler.shards

    sources = []
    for ri, reader in enumerate(readers):
        stats = reader.stats
        if assembler.empty_after[ri]:
            stats.bad["empty_after_tokenization"] += assembler.empty_after[ri]
            stats.documents -= assembler.empty_after[ri]
        sources.append(stats.to_json())
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
    _atomic_json(manifest_path, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest
