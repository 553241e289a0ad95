"""Corpus readers: the formats the paper's data come in, streamed, with every bad record counted.

==========  ==================================================================================
format      what a record is
==========  ==================================================================================
pile        JSON lines (``.jsonl``, ``.jsonl.zst``): ``{"text": ..., "meta": ...}``
wudao       a JSON array of ``{"title": ..., "content": ...}`` objects (or JSON lines of them)
stc         dialogues: a JSON list of lists of turns, ``{"train": [[turn, ...], ...]}``, JSON lines
            of lists, or ``post<TAB>response`` lines; one dialogue = one document, turns on lines
text        plain UTF-8: one document per line (``line``) or blank-line separated (``paragraph``)
==========  ==================================================================================

Bad records (undecodable bytes, malformed JSON, a missing text field, empty documents) are counted
per file in :class:`SourceStats`, never raised from inside the stream. A file that cannot be opened
or decompressed, or that holds bad records only, is a one-line :class:`FpmError` naming it.

Longer than 400 lines: five input formats (Pile JSON lines, WuDao JSON, STC dialogue, plain
text by line or paragraph, JSON arrays), each streamed with its malformed-record accounting.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fpm.errors import FpmError

FORMATS = ("auto", "pile", "wudao", "stc", "text")
CHUNK = 1 << 20


@dataclass
class SourceStats:
    path: str
    format: str
    bytes: int = 0
    sha256: str = ""
    records: int = 0
    documents: int = 0
    bad: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {"path": self.path, "format": self.format, "bytes": self.bytes, "sha256": self.sha256,
                "records": self.records, "documents": self.documents, "bad": dict(sorted(self.bad.items()))}


class _Hashing:
    """Yields the raw (possibly compressed) bytes of a file in chunks while hashing them."""

    def __init__(self, path: Path):
        self.path = path
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def chunks(self) -> Iterator[bytes]:
        try:
            fh = open(self.path, "rb")
        except OSError as exc:
            raise FpmError(f"{self.path}: cannot open ({exc.strerror})") from None
        with fh:
            while True:
                block = fh.read(CHUNK)
                if not block:
                    return
                self.sha.update(block)
                self.nbytes += len(block)
                yield block


def _decompressed(path: Path, raw: Iterator[bytes]) -> Iterator[bytes]:
    if path.suffix != ".zst":
        yield from raw
        return
    import zstandard

    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        for block in raw:
            out = dobj.decompress(block)
            if out:
                yield out
    except zstandard.ZstdError as exc:
        raise FpmError(f"{path}: cannot decompress ({exc})") from None


def _lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    tail = b""
    for block in blocks:
        block = tail + block
        parts = block.split(b"\n")
        tail = parts.pop()
        yield from parts
    if tail:
        yield tail


def _line_blocks(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """Re-cut byte blocks so that each ends at a newline (the last may not)."""
    tail = b""
    for block in blocks:
        block = tail + block
        cut = block.rfind(b"\n") + 1
        tail = block[cut:]
        if cut:
            yield block[:cut]
    if tail:
        yield tail


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.zst", ".json.zst", ".zst")):
        return "pile"
    if name.endswith(".tsv"):
        return "stc"
    if name.endswith(".json"):
        head = _peek(path)
        if head.startswith("[") and '"content"' in head[:4096]:
            return "wudao"
        if head.startswith("{") and '"content"' in head[:4096]:
            return "wudao"
        return "stc"
    return "text"


COMPRESSED = (".zst", ".gz", ".xz", ".bz2")


def check_text_input(path: Path, text_only: bool = True) -> None:
    """An input that cannot hold a corpus is an error before any work: missing, empty, or (with
    ``text_only``, for an uncompressed file) binary — NUL bytes or not UTF-8 in its first 64 KiB.
    ``fpm data prepare`` counts undecodable records as bad instead (text_only=False)."""
    path = Path(path)
    if not path.is_file():
        raise FpmError(f"{path}: input file not found")
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise FpmError(f"{path}: cannot open ({exc.strerror})") from None
    if not head.strip():
        raise FpmError(f"{path}: empty ({'0 bytes' if not head else 'whitespace only'}): no text to read")
    if not text_only or path.name.lower().endswith(COMPRESSED):
        return
    nul = head.find(bytes(1))
    if nul >= 0:
        raise FpmError(f"{path}: binary data (a NUL byte at offset {nul}), not text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the block
            raise FpmError(f"{path}: not UTF-8 text (byte {exc.start}: {head[exc.start:exc.start + 1]!r})") from None


def _peek(path: Path, n: int = 8192) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read(n).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    except OSError as exc:
        raise FpmError(f"{path}: cannot open ({exc.strerror})") from None


class Reader:
    """Iterate over one file's documents; ``stats`` is final once iteration ends."""

    def __init__(self, path: Path, fmt: str = "auto", text_mode: str = "line", text_field: str = "text"):
        self.path = Path(path)
        self.format = detect_format(self.path) if fmt == "auto" else fmt
        if self.format not in FORMATS[1:]:
            raise FpmError(f"{path}: unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
        if text_mode not in ("line", "paragraph"):
            raise FpmError(f"unknown text mode '{text_mode}' (line or paragraph)")
        self.text_mode = text_mode
        self.text_field = text_field
        self.stats = SourceStats(path=str(path), format=self.format)

    def __iter__(self) -> Iterator[str | None]:
        """Yields a document's text, or None for a bad record (already counted)."""
        src = _Hashing(self.path)
        blocks = _decompressed(self.path, src.chunks())
        body = {"pile": self._pile, "wudao": self._wudao, "stc": self._stc, "text": self._text}[self.format]
        for doc in body(blocks):
            self.stats.records += 1
            if doc is not None:
                if doc.strip():
                    self.stats.documents += 1
                    yield doc
                    continue
                self.stats.bad["empty"] += 1
            yield None
        self.stats.bytes = src.nbytes
        self.stats.sha256 = src.sha.hexdigest()
        if self.stats.records and not self.stats.documents and sum(self.stats.bad.values()):
            kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.stats.bad.items()))
            raise FpmError(f"{self.path}: no readable record ({kinds})")

    # --- formats: each yields text, "" (empty) or None (bad, counted)
    def _decode(self, raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.stats.bad["undecodable"] += 1
            return None

    def _json(self, raw: bytes):
        text = self._decode(raw)
        if text is None:
            return None, False
        try:
            return json.loads(text), True
        except json.JSONDecodeError:
            self.stats.bad["bad_json"] += 1
            return None, False

    def _field(self, obj) -> str | None:
        if isinstance(obj, dict) and isinstance(obj.get(self.text_field), str):
            return obj[self.text_field]
        self.stats.bad["missing_field"] += 1
        return None

    def _pile(self, blocks):
        loads = json.loads
        for line in self._decoded_lines(blocks):
            if line is None:
                yield None
                continue
            if not line.strip():
                continue
            try:
                obj = loads(line)
            except json.JSONDecodeError:
                self.stats.bad["bad_json"] += 1
                yield None
                continue
            yield self._field(obj)

    def _wudao_doc(self, obj) -> str | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("content"), str):
            self.stats.bad["missing_field"] += 1
            return None
        title = obj.get("title")
        return f"{title}\n{obj['content']}" if isinstance(title, str) and title.strip() else obj["content"]

    def _wudao(self, blocks):
        first, blocks = _first_block(blocks)
        if not first.lstrip().startswith(b"["):  # JSON lines of WuDao objects
            for raw in _lines(_chain(first, blocks)):
                if raw.strip():
                    obj, ok = self._json(raw)
                    yield self._wudao_doc(obj) if ok else None
            return
        yield from (self._wudao_doc(obj) if obj is not _BAD else None
                    for obj in _json_array(_chain(first, blocks), self))

    def _stc(self, blocks):
        first, blocks = _first_block(blocks)
        head = first.lstrip()
        if head.startswith(b"{") or head.startswith(b"["):
            try:  # one JSON document: a list of dialogues or {"train": [...], "valid": [...]}
                data = json.loads(b"".join(_chain(first, blocks)).decode("utf-8"))
            except UnicodeDecodeError:
                raise FpmError(f"{self.path}: not UTF-8 JSON") from None
            except json.JSONDecodeError:
                data = None
            if data is not None:
                dialogues = data if isinstance(data, list) else [d for v in data.values() if isinstance(v, list) for d in v]
                for d in dialogues:
                    yield self._dialogue(d)
                return
            # not a single JSON document: JSON lines of dialogues
            for raw in _lines(_chain(first, blocks)):
                if raw.strip():
                    obj, ok = self._json(raw)
                    yield self._dialogue(obj) if ok else None
            return
        for raw in _lines(_chain(first, blocks)):  # post<TAB>response
            if not raw.strip():
                continue
            text = self._decode(raw.rstrip(b"\r"))
            if text is None:
                yield None
                continue
            yield self._dialogue(text.split("\t"))

    def _dialogue(self, turns) -> str | None:
        if isinstance(turns, dict):
            turns = turns.get("dialog") or turns.get("conversation") or turns.get("turns")
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            self.stats.bad["missing_field"] += 1
            return None
        return "\n".join(t.strip() for t in turns if t.strip())

    def _decoded_lines(self, blocks) -> Iterator[str | None]:
        """Lines as text; None for an undecodable line (counted). Blocks decode at once when they can."""
        for block in _line_blocks(blocks):
            try:
                lines = block.decode("utf-8").split("\n")
            except UnicodeDecodeError:
                lines = [self._decode(raw) for raw in block.split(b"\n")]
            if lines and lines[-1] == "" and block.endswith(b"\n"):
                lines.pop()
            yield from lines

    def _text(self, blocks):
        if self.text_mode == "line":
            for text in self._decoded_lines(blocks):
                if text is None:
                    yield None
                else:
                    text = text.strip()
                    if text:
                        yield text
            return
        para: list[str] = []
        broken = False
        for raw in _lines(blocks):
            text = self._decode(raw.rstrip(b"\r"))
            if text is None:
                broken = True
                continue
            if text.strip():
                para.append(text.strip())
            elif para or broken:
                yield None if broken and not para else "\n".join(para)
                para, broken = [], False
        if para:
            yield "\n".join(para)
        elif broken:
            yield None


_BAD = object()


def _first_block(blocks) -> tuple[bytes, Iterator[bytes]]:
    """The first non-blank block (to tell a JSON array from JSON lines) and the rest of the stream."""
    blocks = iter(blocks)
    first = b""
    for block in blocks:
        first = block
        if block.strip():
            break
    return first, blocks


def _chain(first: bytes, rest) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _utf8_text(blocks: Iterator[bytes], reader: Reader) -> Iterator[str]:
    """Decode a byte stream as UTF-8, keeping characters split across blocks intact."""
    pending = b""
    seen = 0
    for block in blocks:
        data = pending + block
        try:
            text = data.decode("utf-8")
            pending = b""
        except UnicodeDecodeError as exc:
            if exc.start < len(data) - 4:
                raise FpmError(f"{reader.path}: not UTF-8 (near byte {seen + exc.start})") from None
            text, pending = data[: exc.start].decode("utf-8"), data[exc.start:]
        seen += len(block)
        yield text
    if pending:
        raise FpmError(f"{reader.path}: not UTF-8 (truncated character at the end)")


MAX_ELEMENT = 64 << 20


def _json_array(blocks: Iterator[bytes], reader: Reader) -> Iterator[object]:
    """Stream the elements of a top-level JSON array without loading the whole file.

    A malformed element is counted as ``bad_json`` and skipped up to the next ``}, {``.
    """
    decoder = json.JSONDecoder()
    texts = _utf8_text(blocks, reader)
    skip = re.compile(r"[\s,]*")
    boundary = re.compile(r"\}\s*,\s*(?=\{)")
    buf, eof = "", False

    def more() -> bool:
        nonlocal buf, eof
        for text in texts:
            buf += text
            return True
        eof = True
        return False

    while not buf.lstrip("\ufeff \t\r\n") and more():
        pass
    buf = buf.lstrip("\ufeff \t\r\n")
    if not buf.startswith("["):
        raise FpmError(f"{reader.path}: expected a JSON array of WuDao records")
    buf = buf[1:]
    while True:
        buf = buf[skip.match(buf).end():]
        if not buf:
            if more():
                continue
            reader.stats.bad["bad_json"] += 1  # the array never closed: a truncated file
            yield _BAD
            return
        if buf[0] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf)
        except json.JSONDecodeError:
            if not eof and len(buf) < MAX_ELEMENT and more():
                continue  # probably incomplete: read on
            m = boundary.search(buf)
            while m is None and not eof and len(buf) < MAX_ELEMENT and more():
                m = boundary.search(buf)
            reader.stats.bad["bad_json"] += 1
            yield _BAD
            if m is None:
                return
            buf = buf[m.end():]
            continue
        yield obj
        buf = buf[end:]


# ------------------------------------------------------------------ sentences

_SENT_EN_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")
_SENT_ZH = re.compile(r"[^。！？!?；;…]+(?:[。！？!?；;…]+[”」』）)]*)?|[。！？!?；;…]+[”」』）)]*")


def split_sentences(text: str, language: str) -> list[str]:
    """Split a document into sentences (lines first, then sentence-final punctuation)."""
    out: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        if language == "zh":
            parts = _SENT_ZH.findall(line)
        else:
            parts, start = [], 0
            for m in _SENT_EN_END.finditer(line):
                parts.append(line[start:m.end()])
                start = m.end()
            parts.append(line[start:])
        out.extend(p.strip() for p in parts if p and p.strip())
    return out
