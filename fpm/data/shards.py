"""Binary token shards: ``shard_NNNNN.bin`` (tokens) + ``.idx`` (document/sentence offsets)
[+ ``.ws`` (one word-start byte per token, for whole-word masking)], described by ``manifest.json``.

All arrays are memory-mapped, so reading a 200 GB corpus costs no RAM.

``.idx`` layout (little endian): magic ``FPMIDX01``, uint64 n_docs, uint64 n_sents, then
int64 doc_offsets[n_docs + 1] (token offsets) and int64 sent_offsets[n_sents + 1] (token offsets;
n_sents = 0 when the shard has no sentence index). Every sentence lies inside one document.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpm.errors import FpmError

MAGIC = b"FPMIDX01"
MANIFEST = "manifest.json"
FORMAT = "fpm-shards"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Append documents to one shard; files appear under their final names only on ``close()``."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, sentences: bool, word_starts: bool):
        self.folder, self.name, self.dtype = folder, name, np.dtype(dtype)
        self.sentences, self.word_starts = sentences, word_starts
        self._bin = open(folder / f"{name}.bin.tmp", "wb")
        self._ws = open(folder / f"{name}.ws.tmp", "wb") if word_starts else None
        self.doc_offsets = [0]
        self.sent_offsets = [0]
        self.n_tokens = 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray, sent_lengths: np.ndarray | None = None,
            word_starts: np.ndarray | None = None) -> None:
        """Append a batch of documents: their tokens back to back, with per-document lengths."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        assert int(np.sum(doc_lengths)) == len(tokens)
        self._bin.write(tokens.tobytes())
        if self._ws is not None:
            assert word_starts is not None and len(word_starts) == len(tokens)
            self._ws.write(np.asarray(word_starts, dtype=np.uint8).tobytes())
        self.doc_offsets.extend((self.n_tokens + np.cumsum(doc_lengths)).tolist())
        if self.sentences:
            assert sent_lengths is not None and int(np.sum(sent_lengths)) == len(tokens)
            self.sent_offsets.extend((self.n_tokens + np.cumsum(sent_lengths)).tolist())
        self.n_tokens += len(tokens)

    def close(self) -> dict:
        for fh in (self._bin, self._ws):
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        n_docs = len(self.doc_offsets) - 1
        n_sents = len(self.sent_offsets) - 1 if self.sentences else 0
        idx_tmp = self.folder / f"{self.name}.idx.tmp"
        with open(idx_tmp, "wb") as fh:
            fh.write(MAGIC)
            fh.write(np.array([n_docs, n_sents], dtype="<u8").tobytes())
            fh.write(np.asarray(self.doc_offsets, dtype="<i8").tobytes())
            if n_sents:
                fh.write(np.asarray(self.sent_offsets, dtype="<i8").tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(self.folder / f"{self.name}.bin.tmp", self.folder / f"{self.name}.bin")
        if self._ws is not None:
            os.replace(self.folder / f"{self.name}.ws.tmp", self.folder / f"{self.name}.ws")
        os.replace(idx_tmp, self.folder / f"{self.name}.idx")  # last: the .idx marks a complete shard
        return {"name": self.name, "n_docs": n_docs, "n_sents": n_sents, "n_tokens": self.n_tokens}

    def abort(self) -> None:
        for fh in (self._bin, self._ws):
            if fh is not None and not fh.closed:
                fh.close()
        for suffix in (".bin.tmp", ".ws.tmp", ".idx.tmp"):
            (self.folder / f"{self.name}{suffix}").unlink(missing_ok=True)


@dataclass
class Shard:
    name: str
    tokens: np.ndarray  # memmap
    doc_offsets: np.ndarray
    sent_offsets: np.ndarray | None
    word_starts: np.ndarray | None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]: self.doc_offsets[i + 1]]


def read_shard(folder: Path, name: str, dtype: np.dtype) -> Shard:
    idx_path = folder / f"{name}.idx"
    try:
        with open(idx_path, "rb") as fh:
            magic = fh.read(8)
            if magic != MAGIC:
                raise FpmError(f"{idx_path}: not an fpm shard index")
            n_docs, n_sents = np.frombuffer(fh.read(16), dtype="<u8")
    except OSError as exc:
        raise FpmError(f"{idx_path}: cannot read ({exc.strerror})") from None
    n_docs, n_sents = int(n_docs), int(n_sents)
    docs = np.memmap(idx_path, dtype="<i8", mode="r", offset=24, shape=(n_docs + 1,))
    sents = (np.memmap(idx_path, dtype="<i8", mode="r", offset=24 + 8 * (n_docs + 1), shape=(n_sents + 1,))
             if n_sents else None)
    bin_path = folder / f"{name}.bin"
    n_tokens = int(docs[-1])
    expected = n_tokens * np.dtype(dtype).itemsize
    if not bin_path.is_file() or bin_path.stat().st_size != expected:
        raise FpmError(f"{bin_path}: missing or truncated (expected {expected} bytes)")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    ws_path = folder / f"{name}.ws"
    ws = np.memmap(ws_path, dtype=np.uint8, mode="r", shape=(n_tokens,)) if ws_path.is_file() and n_tokens else None
    return Shard(name, tokens, docs, sents, ws)


class ShardSet:
    """A prepared folder: manifest + shards, memory-mapped."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FpmError(f"{self.folder}: no {MANIFEST}; prepare it with `fpm data prepare`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT or not self.manifest.get("complete"):
            raise FpmError(f"{path}: not a complete fpm shard folder (re-run `fpm data prepare` to finish it)")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards = [read_shard(self.folder, s["name"], self.dtype) for s in self.manifest["shards"]]

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def n_docs(self) -> int:
        return sum(s.n_docs for s in self.shards)

    def documents(self):
        for shard in self.shards:
            for i in range(shard.n_docs):
                yield shard.document(i)
