"""Every vocabulary the paper uses, behind one small interface.

==========  =========================================  ==========================================
kind        paper's vocabulary                          backend
==========  =========================================  ==========================================
wordpiece   BERT English (30,522, lower-cased),         ``tokenizers`` WordPiece (BERT normaliser
            BERT Chinese (21,128)                       and pre-tokenizer)
bpe         GPT-2 byte-level BPE (50,257)               ``tokenizers`` ByteLevel BPE
unigram     CPM SentencePiece unigram (30,000)          ``sentencepiece`` (.model) or ``tokenizers``
                                                        Unigram (trained); jieba + CPM's reversible
                                                        space/newline mapping around it
cpm2        CPM-2 Chinese (26,240 incl. 190 sentinels)  jieba words, then greedy longest match
==========  =========================================  ==========================================

Word segmentation uses ``rjieba``, the Rust port of jieba (same dictionary and algorithm) that
transformers' CPM-Ant tokenizer also uses; it is ~30x faster than the Python jieba.

A saved fpm tokenizer is a folder with ``fpm_tokenizer.json`` (kind, sizes, file names) beside the
backend's files. A vocabulary whose size differs from the recipe's is an error, never a resize.

Longer than 400 lines: four vocabulary kinds (WordPiece, byte-level BPE, Unigram, CPM-2's
jieba-segmented SentencePiece), each with deterministic training, saving and loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import unicodedata
from collections.abc import Iterable, Sequence
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fpm.errors import FpmError, disk_errno

META_FILE = "fpm_tokenizer.json"
SPACE, NEWLINE = "\u2582", "\u2583"  # CPM / CPM-2: reversible stand-ins for ' ' and '\n'
_CPM_TRANSLATE = str.maketrans({" ": SPACE, "\n": NEWLINE})

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<|endoftext|>"]
CPM_SPECIALS = ["<unk>", "<s>", "</s>", "<sep>", "<pad>", "<mask>", "<eod>"]
TINY_SENTINELS = 32


def _jieba():
    import rjieba

    return rjieba


@dataclass
class Specials:
    pad: int
    unk: int
    cls: int | None = None
    sep: int | None = None
    mask: int | None = None
    eod: int | None = None  # appended after each document in packed streams
    eos: int | None = None
    sentinels: list[int] = field(default_factory=list)


class Tokenizer:
    """fpm's tokenizer interface; subclasses wrap one backend."""

    kind: str
    specials: Specials
    lowercase: bool = False

    # --- encoding
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_words(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, word-start flags, tokens per text) for a batch, flat (for whole-word masking)."""
        raise FpmError(f"tokenizer kind {self.kind} has no word boundaries")

    def encode_batch_words(self, texts: Sequence[str]) -> list[tuple[list[int], list[bool]]]:
        """Per text: token ids and a word-start flag per token."""
        tokens, starts, lengths = self.encode_words(texts)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        return [(tokens[a:b].tolist(), starts[a:b].astype(bool).tolist()) for a, b in zip(bounds[:-1], bounds[1:])]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    # --- vocabulary
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    def vocab_list(self) -> list[str]:
        return [self.id_to_token(i) for i in range(self.vocab_size)]

    def vocab_hash(self) -> str:
        cached = getattr(self, "_vocab_hash", None)
        if cached:
            return cached
        h = hashlib.sha256()
        for tok in self.vocab_list():
            h.update(tok.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        self._vocab_hash = h.hexdigest()[:16]
        return self._vocab_hash

    def is_special(self) -> np.ndarray:
        """Boolean mask over the vocabulary: ids never chosen for masking or as random replacements."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        s = self.specials
        for i in (s.pad, s.unk, s.cls, s.sep, s.mask, s.eod, s.eos, *s.sentinels):
            if i is not None:
                mask[i] = True
        for i, tok in enumerate(self.vocab_list()):  # reserved slots: BERT's [unusedN], fpm's fillers
            if tok.startswith("[unused") and tok.endswith("]"):
                mask[i] = True
        return mask

    # --- persistence
    def save(self, out: Path) -> None:
        raise NotImplementedError

    def _write_meta(self, out: Path, **files: str) -> None:
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "lowercase": self.lowercase,
                "vocab_hash": self.vocab_hash(), "files": files}
        (out / META_FILE).write_text(json.dumps(meta, indent=1))


# ------------------------------------------------------------------ tokenizers-backed (WordPiece, BPE, trained)


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer``: BERT WordPiece (en/zh), GPT-2 byte-level BPE, trained vocabularies."""

    def __init__(self, kind: str, backend, lowercase: bool = False, chinese_words: bool = False):
        self.kind = kind
        self.backend = backend
        self.lowercase = lowercase
        self.chinese_words = chinese_words
        vocab = backend.get_vocab()

        def get(*names):
            for n in names:
                if n in vocab:
                    return vocab[n]
            return None

        if kind == "wordpiece":
            self.specials = Specials(pad=get("[PAD]"), unk=get("[UNK]"), cls=get("[CLS]"), sep=get("[SEP]"),
                                     mask=get("[MASK]"))
            missing = [n for n in WORDPIECE_SPECIALS if n not in vocab]
        elif kind == "bpe":
            eod = get("<|endoftext|>")
            self.specials = Specials(pad=eod, unk=eod, eod=eod, eos=eod)
            missing = [n for n in BPE_SPECIALS if n not in vocab]
        else:  # trained unigram / cpm2 stand-ins share CPM's special tokens
            self.specials = Specials(pad=get("<pad>"), unk=get("<unk>"), cls=get("<s>"), sep=get("<sep>"),
                                     mask=get("<mask>"), eod=get("<eod>"), eos=get("</s>"),
                                     sentinels=_sentinel_ids(vocab))
            missing = [n for n in CPM_SPECIALS if n not in vocab]
        if missing:
            raise FpmError(f"{kind} vocabulary lacks special tokens {missing}")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i: int) -> str:
        return self.backend.id_to_token(i)

    def _pre(self, texts: Sequence[str]) -> list[str]:
        if self.kind in ("unigram", "cpm2"):
            return [_cpm_pre(t) for t in texts]
        return list(texts)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self.backend.encode_batch_fast(self._pre(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def encode_words(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.kind != "wordpiece":
            return super().encode_words(texts)
        if not self.chinese_words:
            # English: a token starts a word unless it is a '##' piece
            encs = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
            tokens = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int64, count=int(lengths.sum()))
            return tokens, (~self._continuation()[tokens]).astype(np.uint8), lengths
        # Chinese: words are jieba's; BERT's pre-tokenizer only ever splits *inside* a jieba word
        # (at CJK characters, spaces, punctuation), so encoding each distinct word once and
        # concatenating gives the same ids as encoding the sentence, and the word starts for free.
        cut = _jieba().cut
        words = [_bert_words(cut(t, False)) for t in texts]
        n_words = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        flat = list(chain.from_iterable(words))
        unique = list(dict.fromkeys(flat))
        ids_of = dict(zip(unique, (e.ids for e in self.backend.encode_batch_fast(unique, add_special_tokens=False))))
        word_tokens = [ids_of[w] for w in flat]
        wl = np.fromiter(map(len, word_tokens), dtype=np.int64, count=len(word_tokens))
        tokens = np.fromiter(chain.from_iterable(word_tokens), dtype=np.int64, count=int(wl.sum()))
        starts = np.zeros(len(tokens), dtype=np.uint8)
        first = np.cumsum(wl) - wl
        starts[first[wl > 0]] = 1
        word_bounds = np.concatenate([[0], np.cumsum(n_words)])
        tok_bounds = np.concatenate([[0], np.cumsum(wl)])
        lengths = tok_bounds[word_bounds[1:]] - tok_bounds[word_bounds[:-1]]
        return tokens, starts, lengths

    def _continuation(self) -> np.ndarray:
        cont = getattr(self, "_cont", None)
        if cont is None:
            cont = np.array([t.startswith("##") for t in self.vocab_list()], dtype=bool)
            self._cont = cont
        return cont

    def decode(self, ids: Iterable[int]) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=False)
        if self.kind in ("unigram", "cpm2"):
            return _cpm_post(text)
        return text

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        try:
            self.backend.save(str(out / "tokenizer.json"))
        except Exception as exc:  # the Rust library's I/O errors are plain Exceptions: keep the errno and path
            code = disk_errno(exc)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(out / "tokenizer.json")) from None
        if self.kind == "wordpiece":  # also the classic vocab.txt, for BertTokenizer users
            (out / "vocab.txt").write_text("\n".join(self.vocab_list()) + "\n", encoding="utf-8")
        self._write_meta(out, tokenizer="tokenizer.json", chinese_words=str(self.chinese_words))


def _bert_boundary_char(c: str) -> bool:
    """Characters at which BERT's pre-tokenizer always splits: space, punctuation, CJK, control."""
    if c.isspace():
        return True
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    cat = unicodedata.category(c)
    if cat.startswith("P") or cat in ("Cc", "Cf"):
        return True
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


_BOUNDARY: dict[str, bool] = {}


def _bert_words(words: list[str]) -> list[str]:
    """Merge jieba words that BERT's pre-tokenizer sees as one token (e.g. '20' + '℃', 'ъ' + 'л'),
    so that every word is a union of whole BERT pre-tokens."""
    out: list[str] = []
    b = _BOUNDARY
    for w in words:
        if out:
            last, first = out[-1][-1], w[0]
            lb = b.get(last)
            if lb is None:
                lb = b[last] = _bert_boundary_char(last)
            fb = b.get(first)
            if fb is None:
                fb = b[first] = _bert_boundary_char(first)
            if not lb and not fb:
                out[-1] += w
                continue
        out.append(w)
    return out


def _sentinel_ids(vocab: dict[str, int]) -> list[int]:
    ids = []
    k = 0
    while f"<s_{k}>" in vocab:
        ids.append(vocab[f"<s_{k}>"])
        k += 1
    return ids


def _cpm_pre(text: str) -> str:
    """CPM: jieba words with ' ' and '\\n' mapped to ▂ and ▃, joined by spaces for the unigram model."""
    words = _jieba().cut(text, False)
    if " " in text or "\n" in text:  # most Chinese documents have neither: skip the per-word pass
        words = [w.translate(_CPM_TRANSLATE) if (" " in w or "\n" in w) else w for w in words]
    return " ".join(words)


def _cpm_post(text: str) -> str:
    return text.replace(" ", "").replace("\u2581", "").replace(SPACE, " ").replace(NEWLINE, "\n")


# ------------------------------------------------------------------ CPM SentencePiece


class SentencePieceCPM(Tokenizer):
    """CPM's SentencePiece unigram model, with CPM's jieba pre-segmentation and ▂/▃ mapping."""

    kind = "unigram"

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        missing = [n for n in CPM_SPECIALS if n not in vocab]
        if missing:
            raise FpmError(f"{model_file}: not a CPM vocabulary, lacks {missing}")
        self.specials = Specials(pad=vocab["<pad>"], unk=vocab["<unk>"], cls=vocab["<s>"], sep=vocab["<sep>"],
                                 mask=vocab["<mask>"], eod=vocab["<eod>"], eos=vocab["</s>"],
                                 sentinels=_sentinel_ids(vocab))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode([_cpm_pre(t) for t in texts])

    def decode(self, ids: Iterable[int]) -> str:
        return _cpm_post(self.sp.decode([int(i) for i in ids]))

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.model_file, out / "spiece.model")
        self._write_meta(out, model="spiece.model")


# ------------------------------------------------------------------ CPM-2


class CPM2Tokenizer(Tokenizer):
    """CPM-2: jieba words (▂/▃ for space/newline), each split by greedy longest match over vocab.txt;
    a character that matches nothing becomes <unk>. No '##' marks: CPM-2 merged 'x' and '_x'."""

    kind = "cpm2"

    def __init__(self, vocab_file: Path):
        self.vocab_file = Path(vocab_file)
        tokens = self.vocab_file.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        missing = [n for n in CPM_SPECIALS if n not in self.vocab]
        if missing:
            raise FpmError(f"{vocab_file}: not a CPM-2 vocabulary, lacks {missing}")
        self.max_len = max(len(t) for t in tokens)
        v = self.vocab
        self.specials = Specials(pad=v["<pad>"], unk=v["<unk>"], cls=v["<s>"], sep=v["<sep>"], mask=v["<mask>"],
                                 eod=v["<eod>"], eos=v["</s>"], sentinels=_sentinel_ids(v))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def _word(self, word: str, out: list[int]) -> None:
        vocab, unk, n = self.vocab, self.specials.unk, len(word)
        start = 0
        while start < n:
            end = min(n, start + self.max_len)
            while end > start and word[start:end] not in vocab:
                end -= 1
            if end == start:
                out.append(unk)
                start += 1
            else:
                out.append(vocab[word[start:end]])
                start = end

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        cut = _jieba().cut
        result = []
        for text in texts:
            ids: list[int] = []
            for w in cut(text, False):
                self._word(w.translate(_CPM_TRANSLATE), ids)
            result.append(ids)
        return result

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[int(i)] for i in ids).replace(SPACE, " ").replace(NEWLINE, "\n")

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.txt").write_text("\n".join(self.tokens) + "\n", encoding="utf-8")
        self._write_meta(out, vocab="vocab.txt")


# ------------------------------------------------------------------ loading


def _find(folder: Path, *names: str) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def load_tokenizer_path(kind: str, path: str | Path, lowercase: bool = False, language: str = "en") -> Tokenizer:
    """Load a vocabulary of ``kind`` from a local file or folder (official files or an fpm folder)."""
    from tokenizers import Tokenizer as TkTokenizer

    p = Path(path)
    if not p.exists():
        raise FpmError(f"tokenizer path not found: {p}")
    folder = p if p.is_dir() else p.parent
    meta_file = folder / META_FILE
    if p.is_dir() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta["kind"] != kind:
            raise FpmError(f"{p}: holds a {meta['kind']} tokenizer, the recipe asks for {kind}")
        files = meta["files"]
        if "tokenizer" in files:
            return HFTokenizer(kind, TkTokenizer.from_file(str(folder / files["tokenizer"])),
                               lowercase=meta.get("lowercase", False),
                               chinese_words=files.get("chinese_words") == "True")
        if "model" in files:
            return SentencePieceCPM(folder / files["model"])
        return CPM2Tokenizer(folder / files["vocab"])
    try:
        if kind == "wordpiece":
            from tokenizers.implementations import BertWordPieceTokenizer

            vocab = p if p.is_file() and p.suffix == ".txt" else _find(folder, "vocab.txt")
            if vocab is None:
                tj = p if p.suffix == ".json" else _find(folder, "tokenizer.json")
                if tj is None:
                    raise FpmError(f"{p}: no vocab.txt or tokenizer.json for a WordPiece vocabulary")
                return HFTokenizer(kind, TkTokenizer.from_file(str(tj)), lowercase, chinese_words=language == "zh")
            bert = BertWordPieceTokenizer(str(vocab), lowercase=lowercase, strip_accents=lowercase)
            return HFTokenizer(kind, bert._tokenizer, lowercase, chinese_words=language == "zh")
        if kind == "bpe":
            from tokenizers.implementations import ByteLevelBPETokenizer

            tj = p if p.suffix == ".json" and p.name == "tokenizer.json" else _find(folder, "tokenizer.json")
            vocab = _find(folder, "encoder.json", "vocab.json")
            merges = _find(folder, "merges.txt")
            if vocab is not None and merges is not None:
                bpe = ByteLevelBPETokenizer(str(vocab), str(merges))
                return HFTokenizer(kind, bpe._tokenizer)
            if tj is not None:
                return HFTokenizer(kind, TkTokenizer.from_file(str(tj)))
            raise FpmError(f"{p}: no encoder.json + merges.txt (or tokenizer.json) for a byte-level BPE vocabulary")
        if kind == "unigram":
            model = p if p.suffix == ".model" else _find(folder, "chinese_vocab.model", "spiece.model")
            if model is not None:
                return SentencePieceCPM(model)
            tj = _find(folder, "tokenizer.json")
            if tj is not None:
                return HFTokenizer(kind, TkTokenizer.from_file(str(tj)))
            raise FpmError(f"{p}: no SentencePiece .model (or tokenizer.json) for a unigram vocabulary")
        if kind == "cpm2":
            vocab = p if p.is_file() else _find(folder, "vocab.txt")
            if vocab is None:
                raise FpmError(f"{p}: no vocab.txt for a CPM-2 vocabulary")
            return CPM2Tokenizer(vocab)
    except FpmError:
        raise
    except Exception as exc:  # a backend refusing a file: name the file
        raise FpmError(f"{p}: cannot load a {kind} vocabulary ({type(exc).__name__}: {exc})") from None
    raise FpmError(f"unknown tokenizer kind {kind}")


HUB_FILES = {
    "wordpiece": ["vocab.txt", "tokenizer.json"],
    "bpe": ["vocab.json", "merges.txt"],
    "unigram": ["spiece.model"],
    "cpm2": ["vocab.txt"],
}


def download_tokenizer(kind: str, hub: str) -> Path:
    """Fetch a vocabulary from the Hugging Face Hub once (online machines); returns the local folder."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub, allow_patterns=HUB_FILES[kind]))
    except Exception as exc:
        raise FpmError(
            f"cannot fetch tokenizer '{hub}' from the Hugging Face Hub ({type(exc).__name__}); on an offline "
            f"machine download it once elsewhere and set tokenizer.path to the folder"
        ) from None


def load_tokenizer(cfg, language: str = "en", trained_dir: Path | None = None) -> Tokenizer:
    """The recipe's tokenizer (``cfg`` is a TokenizerCfg); checks its size against the recipe."""
    if cfg.path:
        tok = load_tokenizer_path(cfg.kind, cfg.path, cfg.lowercase, language)
        where = cfg.path
    elif cfg.train:
        if trained_dir is None or not (trained_dir / META_FILE).is_file():
            raise FpmError("tokenizer.train is set but no trained tokenizer was given")
        tok = load_tokenizer_path(cfg.kind, trained_dir, cfg.lowercase, language)
        where = str(trained_dir)
    elif cfg.hub:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FpmError(
                f"tokenizer.hub={cfg.hub} needs the Hugging Face Hub, but HF_HUB_OFFLINE=1; set tokenizer.path "
                "to a local folder with the vocabulary files"
            )
        tok = load_tokenizer_path(cfg.kind, download_tokenizer(cfg.kind, cfg.hub), cfg.lowercase, language)
        where = cfg.hub
    else:
        raise FpmError("the recipe names no tokenizer: set tokenizer.path, tokenizer.hub or tokenizer.train=true")
    if tok.vocab_size != cfg.vocab_size:
        raise FpmError(
            f"tokenizer {where} has {tok.vocab_size} tokens but the recipe says tokenizer.vocab_size="
            f"{cfg.vocab_size}; fpm does not resize vocabularies silently"
        )
    return tok


# ------------------------------------------------------------------ training (tiny preset, users without a vocabulary)


def train_tokenizer(kind: str, files: Sequence[Path] | None, vocab_size: int, out: Path, *,
                    texts: Iterable[str] | None = None, lowercase: bool = False, language: str = "en",
                    sentinels: int = TINY_SENTINELS) -> tuple[Tokenizer, int]:
    """Train a ``kind`` vocabulary of exactly ``vocab_size`` entries with ``tokenizers``.

    When the corpus is too small to yield that many pieces, the rest is filled with reserved
    ``[unusedN]`` tokens (as BERT's own vocabulary does) and their number is returned, so callers
    can report it. Returns (tokenizer, reserved_count).

    Deterministic: the same corpus gives the same files in every process. ``tokenizers``' own
    trainers are not: WordPiece numbers its ``##x`` continuation pieces in hash order and its BPE
    core breaks ties between equally frequent merges by those numbers (different ids, and different
    pieces where ties meet the size cut-off); Unigram sums its EM statistics in hash order (scores
    that differ by ~1e-4, hence the order of pieces). fpm trains WordPiece as plain BPE over words
    whose non-initial characters are spelled as private-use stand-ins (:class:`_Continuations`),
    which the BPE core numbers in code-point order, and converts the merges back to ``##`` pieces as
    ``WordPieceTrainer`` does internally; Unigram with ``sentencepiece``'s trainer, the reference
    implementation, on a fixed number of threads (:func:`_sentencepiece_unigram`). GPT-2's
    byte-level BPE starts from a fixed 256-symbol alphabet and was deterministic already.
    """
    from tokenizers import Tokenizer as TkTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    def corpus() -> Iterable[str]:
        if texts is not None:
            yield from texts
        for f in files or []:
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield from fh

    if kind == "wordpiece":
        specials = list(WORDPIECE_SPECIALS)
        tk = TkTokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                   strip_accents=lowercase, lowercase=lowercase)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece()
        spelling = _Continuations()  # see the docstring: BPE over words spelled with stand-ins
        bpe = TkTokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1,
                                      show_progress=False)
        bpe.train_from_iterator(spelling.words(corpus(), tk.normalizer, tk.pre_tokenizer), trainer=trainer)
        tk.model = models.WordPiece(vocab=spelling.vocab(bpe), unk_token="[UNK]", max_input_chars_per_word=100)
    elif kind == "bpe":
        specials = list(BPE_SPECIALS)
        tk = TkTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(corpus(), trainer=trainer)
    elif kind in ("unigram", "cpm2"):
        specials = list(CPM_SPECIALS) + [f"<s_{i}>" for i in range(sentinels if kind == "cpm2" else 0)]
        tk = TkTokenizer(_sentencepiece_unigram((_cpm_pre(line) for line in corpus()), vocab_size, specials))
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
    else:
        raise FpmError(f"unknown tokenizer kind {kind}")
    tk.add_special_tokens(specials)  # already in the vocabulary: never split, skipped when decoding
    got = tk.get_vocab_size(with_added_tokens=True)
    if got > vocab_size:
        raise FpmError(f"trained vocabulary has {got} entries, more than the {vocab_size} asked for")
    reserved = vocab_size - got
    if reserved:
        tk.add_tokens([f"[unused{i}]" for i in range(reserved)])
    tok = HFTokenizer(kind, tk, lowercase=lowercase, chinese_words=(kind == "wordpiece" and language == "zh"))
    assert tok.vocab_size == vocab_size, (tok.vocab_size, vocab_size)
    tok.save(out)
    return tok, reserved


class _Continuations:
    """WordPiece training as plain BPE: every character after a word's first is spelled as a
    private-use stand-in ("walked" -> "w" + stand-ins of "alked"), so the BPE core numbers
    continuation characters by code point like the others. Stand-ins: U+F0000 + code point for the
    Basic Multilingual Plane, plane 16 (first seen first) for the rare others; private-use
    characters of planes 15-16 in the corpus itself are dropped from the training text."""

    BMP, ASTRAL = 0xF0000, 0x100000

    def __init__(self):
        self.astral: dict[str, str] = {}

    def _spell(self, c: str) -> str:
        if ord(c) < 0x10000:
            return chr(self.BMP + ord(c))
        return self.astral.setdefault(c, chr(self.ASTRAL + len(self.astral)))

    def words(self, lines: Iterable[str], normalizer, pre_tokenizer) -> Iterable[str]:
        """Each line as BERT normalises and splits it, words separated by spaces, spelled as above."""
        for line in lines:
            out = []
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
                word = "".join(c for c in word if ord(c) < self.BMP)
                if word:
                    out.append(word[0] + "".join(self._spell(c) for c in word[1:]))
            yield " ".join(out)

    def vocab(self, bpe_tokenizer) -> dict[str, int]:
        """The trained BPE vocabulary spelled back: a piece that starts with a stand-in continues a
        word (``##`` prefix), any other starts one. Ids are kept."""
        astral = {v: k for k, v in self.astral.items()}

        def back(c: str) -> str:
            o = ord(c)
            return c if o < self.BMP else chr(o - self.BMP) if o < self.ASTRAL else astral[c]

        return {("##" if ord(piece[0]) >= self.BMP else "") + "".join(map(back, piece)): i
                for piece, i in bpe_tokenizer.get_vocab(with_added_tokens=True).items()}


SPM_THREADS = 8  # sentencepiece's EM splits the corpus by thread: a fixed count, whatever the machine


def _sentencepiece_unigram(lines: Iterable[str], vocab_size: int, specials: list[str]):
    """A ``tokenizers`` Unigram model trained by ``sentencepiece`` on ``lines`` (space-separated
    words): ``specials`` first (score 0), then sentencepiece's pieces with their scores, at most
    ``vocab_size`` in all (a small corpus may give fewer; the caller fills the rest)."""
    import io

    import sentencepiece as spm
    from tokenizers import models

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="unigram",
            vocab_size=vocab_size - len(specials) + 1,  # + its own <unk>, replaced by ours
            character_coverage=1.0, max_sentencepiece_length=8, split_by_whitespace=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=SPM_THREADS,
            input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as exc:  # an empty corpus, for one
        raise FpmError(f"sentencepiece could not train a vocabulary: {str(exc).splitlines()[-1][:200]}") from None
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)]
    return models.Unigram([(s, 0.0) for s in specials] + pieces, unk_id=specials.index("<unk>"), byte_fallback=False)
