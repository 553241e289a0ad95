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
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fpm.errors import FpmError
from fpm.files import crc32_of

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
        self._crc = {"bin": 0, "ws": 0}
        self.doc_offsets = [0]
        self.sent_offsets = [0]
        self.n_tokens = 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray, sent_lengths: np.ndarray | None = None,
            word_starts: np.ndarray | None = None) -> None:
        """Append a batch of documents: their tokens back to back, with per-document lengths."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        assert int(np.sum(doc_lengths)) == len(tokens)
        data = tokens.tobytes()
        self._bin.write(data)
        self._crc["bin"] = zlib.crc32(data, self._crc["bin"])
        if self._ws is not None:
            assert word_starts is not None and len(word_starts) == len(tokens)
            data = np.asarray(word_starts, dtype=np.uint8).tobytes()
            self._ws.write(data)
            self._crc["ws"] = zlib.crc32(data, self._crc["ws"])
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
        idx = (MAGIC + np.array([n_docs, n_sents], dtype="<u8").tobytes()
               + np.asarray(self.doc_offsets, dtype="<i8").tobytes()
               + (np.asarray(self.sent_offsets, dtype="<i8").tobytes() if n_sents else b""))
        with open(idx_tmp, "wb") as fh:
            fh.write(idx)
            fh.flush()
            os.fsync(fh.fileno())
        size = self.n_tokens * self.dtype.itemsize
        files = {f"{self.name}.bin": [size, self._crc["bin"]], f"{self.name}.idx": [len(idx), zlib.crc32(idx)]}
        if self._ws is not None:
            files[f"{self.name}.ws"] = [self.n_tokens, self._crc["ws"]]
        os.replace(self.folder / f"{self.name}.bin.tmp", self.folder / f"{self.name}.bin")
        if self._ws is not None:
            os.replace(self.folder / f"{self.name}.ws.tmp", self.folder / f"{self.name}.ws")
        os.replace(idx_tmp, self.folder / f"{self.name}.idx")  # last: the .idx marks a complete shard
        return {"name": self.name, "n_docs": n_docs, "n_sents": n_sents, "n_tokens": self.n_tokens, "files": files}

    def abort(self) -> None:
        for fh in (self._bin, self._ws):
            if fh is not None and not fh.closed:
                try:
                    fh.close()
                except OSError:  # flushing what is buffered fails the same way on a full disk
                    pass
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


def _damaged(path: Path, what: str) -> FpmError:
    return FpmError(f"{path}: {what}; the shard folder was damaged after `fpm data prepare` wrote it "
                    f"(`fpm data verify {path.parent}` checks every file; prepare it again)")


def check_sizes(folder: Path, entry: dict) -> None:
    """Every file of a shard has the size the manifest recorded (cheap: no reading)."""
    for fname, (size, _crc) in entry.get("files", {}).items():
        path = folder / fname
        if not path.is_file():
            raise _damaged(path, "missing")
        if path.stat().st_size != size:
            raise _damaged(path, f"{path.stat().st_size} bytes, {size} were written")


def verify_shard(folder: Path, entry: dict) -> str | None:
    """Sizes and checksums of a shard's files against the manifest: None if intact, else the
    first problem, naming the file."""
    try:
        check_sizes(folder, entry)
    except FpmError as exc:
        return str(exc).split(";")[0]
    for fname, (_size, crc) in entry.get("files", {}).items():
        if crc32_of(folder / fname) != crc:
            return f"{folder / fname}: does not match the checksum recorded when it was written"
    return None


def read_shard(folder: Path, name: str, dtype: np.dtype, entry: dict | None = None) -> Shard:
    """Memory-map one shard, checking sizes first (against the manifest ``entry`` where it records
    them, and always against the index's own counts), so a damaged file is an error naming it."""
    idx_path = folder / f"{name}.idx"
    if entry is not None:
        check_sizes(folder, entry)
    try:
        with open(idx_path, "rb") as fh:
            magic = fh.read(8)
            if magic != MAGIC:
                raise _damaged(idx_path, "not an fpm shard index")
            header = fh.read(16)
        if len(header) != 16:
            raise _damaged(idx_path, "truncated")
        n_docs, n_sents = (int(v) for v in np.frombuffer(header, dtype="<u8"))
        expected_idx = 24 + 8 * (n_docs + 1) + (8 * (n_sents + 1) if n_sents else 0)
        if idx_path.stat().st_size != expected_idx:
            raise _damaged(idx_path, f"{idx_path.stat().st_size} bytes, its header needs {expected_idx}")
    except OSError as exc:
        raise FpmError(f"{idx_path}: cannot read ({exc.strerror})") from None
    docs = np.memmap(idx_path, dtype="<i8", mode="r", offset=24, shape=(n_docs + 1,))
    sents = (np.memmap(idx_path, dtype="<i8", mode="r", offset=24 + 8 * (n_docs + 1), shape=(n_sents + 1,))
             if n_sents else None)
    bin_path = folder / f"{name}.bin"
    n_tokens = int(docs[-1])
    expected = n_tokens * np.dtype(dtype).itemsize
    if n_tokens < 0 or not bin_path.is_file() or bin_path.stat().st_size != expected:
        raise _damaged(bin_path, f"missing or not {expected} bytes as its index says")
    if int(docs[0]) != 0 or (sents is not None and (int(sents[0]) != 0 or int(sents[-1]) != n_tokens)):
        raise _damaged(idx_path, "offsets do not start at 0 or end at the shard's length")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    ws_path = folder / f"{name}.ws"
    ws = None
    if ws_path.is_file() and n_tokens:
        if ws_path.stat().st_size != n_tokens:
            raise _damaged(ws_path, f"{ws_path.stat().st_size} bytes, the shard has {n_tokens} tokens")
        ws = np.memmap(ws_path, dtype=np.uint8, mode="r", shape=(n_tokens,))
    return Shard(name, tokens, docs, sents, ws)


class ShardSet:
    """A prepared folder: manifest + shards, memory-mapped; ``part="validation"``: its held-out
    validation part (``fpm data prepare --validation``)."""

    def __init__(self, folder: Path | str, part: str = "train"):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FpmError(f"{self.folder}: no {MANIFEST}; prepare it with `fpm data prepare`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT or not self.manifest.get("complete"):
            raise FpmError(f"{path}: not a complete fpm shard folder (re-run `fpm data prepare` to finish it)")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.part = part
        self.entries = part_entries(self.manifest, part, path)
        self.shards = [read_shard(self.folder, s["name"], self.dtype, s) for s in self.entries]
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])

    def damaged(self, shard_index: int, what: str) -> FpmError:
        """The error for a shard found wrong while reading it (a token outside the vocabulary, an
        offset outside the shard): names the file whose checksum fails, if one does."""
        entry = self.entries[shard_index]
        problem = verify_shard(self.folder, entry) if entry.get("files") else None
        return _damaged(self.folder / f"{entry['name']}.bin", what) if problem is None else FpmError(
            f"{problem}: the shard folder was damaged after `fpm data prepare` wrote it (prepare it again)")

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


def part_entries(manifest: dict, part: str, path: Path) -> list[dict]:
    """The shard entries of a prepared folder's ``train`` or ``validation`` part."""
    if part == "train":
        return manifest["shards"]
    if part != "validation":
        raise ValueError(part)
    val = manifest.get("validation")
    if not val or not val.get("shards"):
        raise FpmError(f"{path}: no validation part (prepare with `fpm data prepare --validation 0.01` or "
                       "--validation-input FILE)")
    return val["shards"]


def verify_folder(folder: Path | str) -> tuple[int, list[str]]:
    """Everything ``fpm data verify`` checks: the manifest, every shard file's size and checksum,
    the index's offsets (non-decreasing, ending at the shard's length) and every token id against
    the vocabulary. Returns (files checked, problems, each naming its file)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FpmError(f"{folder}: no {MANIFEST}; prepare it with `fpm data prepare`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise FpmError(f"{path}: not valid JSON") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise FpmError(f"{path}: not a complete fpm shard folder (re-run `fpm data prepare` to finish it)")
    dtype, vocab = np.dtype(manifest["dtype"]), int(manifest["tokenizer"]["vocab_size"])
    problems: list[str] = []
    checked = 0
    for entry in manifest["shards"] + (manifest.get("validation") or {}).get("shards", []):
        if not entry.get("files"):
            problems.append(f"{folder / entry['name']}.*: no checksums in the manifest (prepared by an older "
                            "fpm): sizes and contents checked only")
        else:
            checked += len(entry["files"])
            problem = verify_shard(folder, entry)
            if problem:
                problems.append(problem)
                continue
        try:
            shard = read_shard(folder, entry["name"], dtype, entry)
        except FpmError as exc:
            problems.append(str(exc).split(";")[0])
            continue
        for name, offsets in (("document", shard.doc_offsets), ("sentence", shard.sent_offsets)):
            if offsets is not None and (np.diff(np.asarray(offsets)) < 0).any():
                problems.append(f"{folder / entry['name']}.idx: {name} offsets decrease")
        for lo in range(0, shard.n_tokens, 1 << 24):
            top = int(np.asarray(shard.tokens[lo: lo + (1 << 24)]).max())
            if top >= vocab:
                problems.append(f"{folder / entry['name']}.bin: token id {top} is outside the {vocab}-token vocabulary")
                break
    return checked, problems
