"""Tokenized chunks → shards: the training part and the held-out validation part.

A document goes to the validation part when its input file is a validation input, or when the
64-bit BLAKE2b hash of its text falls below ``fraction × 2⁶⁴`` (:func:`held_out`): whole
documents, chosen by their content alone — the same documents whatever the worker count, chunking
or file order, and a document repeated in the corpus is never on both sides.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from fpm.data import shards as sh
from fpm.rundir import write_json

PROGRESS = "progress.json"
HELD_OUT_RULE = "blake2b-64(document text, utf-8) < fraction x 2^64"


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the validation part at ``fraction``."""
    return fraction > 0.0 and text_hash(text) < fraction * 2.0 ** 64


def fraction_for_tokens(texts, tokens: int, encode_batch, sample: int = 256) -> float:
    """The hash fraction whose held-out documents hold about ``tokens`` tokens: every document's
    hash and length are read (one pass, no tokenizing), tokens per character are measured on the
    first ``sample`` documents, and the documents are taken in hash order until the estimate
    reaches ``tokens``."""
    hashes, chars, first = [], [], []
    for text in texts:
        hashes.append(text_hash(text))
        chars.append(len(text))
        if len(first) < sample:
            first.append(text)
    if not hashes:
        return 0.0
    per_char = sum(len(ids) for ids in encode_batch(first)) / max(1, sum(map(len, first)))
    order = np.argsort(np.asarray(hashes, dtype=np.uint64), kind="stable")
    estimate = np.cumsum(np.asarray(chars, dtype=np.float64)[order]) * per_char
    at = int(np.searchsorted(estimate, tokens, side="left"))
    if at >= len(order) - 1:
        raise ValueError(f"the corpus holds about {int(estimate[-1]):,} tokens; {tokens:,} cannot be held out "
                         "and leave anything to train on")
    return (hashes[int(order[at])] + 1) / 2.0 ** 64


class ShardAssembler:
    """Appends tokenized chunks to shards of ``shard_tokens`` tokens, finishing a shard at the
    document that fills it; after each finished shard, ``progress.json`` records the shards so far
    and how many input records they cover (what a resumed preparation skips).

    A ``validation`` companion (its shards named ``val_*``) collects the held-out documents; it
    never finishes a shard by size: its open shard is finished with each training shard. With a
    companion, training shards end at chunk boundaries only (:meth:`feed` with ``split=False``,
    then :meth:`finish_if_full`: a shard may pass ``shard_tokens`` by up to one chunk), so the
    progress record covers both parts up to the same input record."""

    def __init__(self, out: Path, key: str, dtype, sentences: bool, word_starts: bool, shard_tokens: int,
                 done_shards: list[dict], records_done: int, empty_after: dict[int, int], *,
                 prefix: str = "shard", validation: ShardAssembler | None = None):
        self.out, self.key, self.dtype = out, key, dtype
        self.sentences, self.word_starts, self.shard_tokens = sentences, word_starts, shard_tokens
        self.shards = list(done_shards)
        self.records_done = records_done
        self.empty_after = Counter(empty_after)  # per input: documents with no token left
        self.writer: sh.ShardWriter | None = None
        self.prefix, self.validation = prefix, validation
        self.chars = 0  # characters of the documents fed (the validation part's bits per character)

    @property
    def tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards) + (self.writer.n_tokens if self.writer else 0)

    def _finish_shard(self, records: int) -> None:
        self.shards.append(self.writer.close())
        self.writer = None
        self.records_done = records
        state = {"config_key": self.key, "shards": self.shards, "records_done": records,
                 "empty_after": dict(self.empty_after)}
        if self.validation is not None:
            self.validation.flush()
            state["validation"] = {"shards": self.validation.shards, "empty_after": dict(self.validation.empty_after),
                                   "chars": self.validation.chars}
        write_json(self.out / PROGRESS, state)

    def flush(self) -> None:
        """Finish the open shard (if it holds anything) without recording progress."""
        if self.writer is not None and self.writer.n_tokens:
            self.shards.append(self.writer.close())
            self.writer = None

    def feed(self, ri: int, where: list[int], chunk_end: int, res: dict, split: bool = True) -> None:
        """Append a chunk's documents (input ``ri``; ``where``: each document's record number;
        ``chunk_end``: records consumed at the chunk's end); without ``split``, all of them to the
        open shard, whatever its size."""
        lens = res["doc_lens"]
        tok_off = np.concatenate([[0], np.cumsum(lens)])
        sent_off = sent_tok = None
        if self.sentences:
            sent_off = np.concatenate([[0], np.cumsum(res["sents_per_doc"])])
            sent_tok = np.concatenate([[0], np.cumsum(res["sent_lens"])])
        i, n = 0, len(lens)
        while i < n:
            if self.writer is None:
                self.writer = sh.ShardWriter(self.out, f"{self.prefix}_{len(self.shards):05d}", self.dtype, self.sentences,
                                             self.word_starts)
            room = self.shard_tokens - self.writer.n_tokens if split else sys.maxsize
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
            if split and self.writer.n_tokens >= self.shard_tokens:
                self._finish_shard(where[j] if j < n - 1 else chunk_end)
            i = j + 1
        if split and n == 0:
            self.finish_if_full(chunk_end)

    def finish_if_full(self, records: int) -> None:
        if self.writer is not None and self.writer.n_tokens >= self.shard_tokens:
            self._finish_shard(records)

    def close(self, records: int) -> None:
        """Finish the last, partly filled shard (``records``: every input record read)."""
        if self.writer is not None and self.writer.n_tokens:
            self._finish_shard(records)
        if self.validation is not None:
            self.validation.flush()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()  # no half-written shard stays behind under a final name
        if self.validation is not None:
            self.validation.abort()
