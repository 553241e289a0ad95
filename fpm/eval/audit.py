"""What a task's data looks like before anyone trusts a score on it (`fpm data audit`, and
beside every `fpm finetune` and sweep).

Per split: label distribution, empty fields, length distribution (English: words; Chinese:
characters). Duplicates: exact and normalised (NFKC, lower-cased, punctuation and spaces removed)
texts repeated within train, and train texts that reappear in dev/test — for sentence-pair tasks
the unit is the *unordered* pair, so (a, b) and (b, a) count as the same. Counts come with a few
examples each. Bad rows are the loaders' own accounting (see :mod:`fpm.data.tasks`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from fpm.data.tasks import Example, Split, load_split

_PUNCT_SPACE = re.compile(r"[\W_]+", re.UNICODE)
_WORD = re.compile(r"\w+", re.UNICODE)


def normalise(text: str) -> str:
    return _PUNCT_SPACE.sub("", unicodedata.normalize("NFKC", text).lower())


def key(example: Example, pair: bool, norm: bool) -> tuple | str:
    texts = [normalise(t) if norm else t for t in example.texts]
    if pair:
        return tuple(sorted(texts[:2]))
    return texts[0]


def length(text: str, language: str) -> int:
    return len(text) if language == "zh" else len(_WORD.findall(text))


def _dupes_within(examples: list[Example], pair: bool, norm: bool) -> tuple[int, list]:
    groups: dict = {}
    for e in examples:
        groups.setdefault(key(e, pair, norm), []).append(e)
    repeated = {k: v for k, v in groups.items() if len(v) > 1}
    n_extra = sum(len(v) - 1 for v in repeated.values())
    samples = [[{"id": e.id, "line": e.line, "texts": list(e.texts)} for e in v[:2]] for v in list(repeated.values())[:3]]
    return n_extra, samples


def _overlap(train: list[Example], other: list[Example], pair: bool, norm: bool) -> tuple[int, list]:
    seen = {key(e, pair, norm) for e in train}
    hits = [e for e in other if key(e, pair, norm) in seen]
    return len(hits), [{"id": e.id, "line": e.line, "texts": list(e.texts)} for e in hits[:3]]


def audit_splits(task, splits: dict[str, Split]) -> dict:
    pair = task.name == "qqp"
    out: dict = {"task": task.name, "fields": list(task.fields), "unit": "unordered question pair" if pair else task.fields[0],
                 "length_unit": "characters" if task.language == "zh" else "words", "splits": {}}
    for name, split in splits.items():
        ex = split.examples
        labels = Counter(task.labels[e.label] for e in ex if e.label is not None)
        info = {"file": str(split.path), "rows": split.rows, "examples": len(ex), "bad_rows": dict(split.bad),
                "labels": dict(sorted(labels.items())),
                "majority_share": (max(labels.values()) / sum(labels.values())) if labels else None,
                "empty_fields": {f: sum(1 for e in ex if i < len(e.texts) and not e.texts[i])
                                 for i, f in enumerate(task.fields)}}
        for i, f in enumerate(task.fields):
            lens = np.array([length(e.texts[i], task.language) for e in ex if i < len(e.texts)]) if ex else np.zeros(1)
            info[f"length_{f}"] = {"mean": float(lens.mean()), "p50": float(np.percentile(lens, 50)),
                                   "p95": float(np.percentile(lens, 95)), "max": int(lens.max())}
        for norm in (False, True):
            n, samples = _dupes_within(ex, pair, norm)
            info[f"duplicates_within_{'normalised' if norm else 'exact'}"] = {"count": n, "examples": samples}
        out["splits"][name] = info
    train = splits.get("train")
    if train is not None:
        for name, split in splits.items():
            if name == "train":
                continue
            for norm in (False, True):
                n, samples = _overlap(train.examples, split.examples, pair, norm)
                out["splits"][name][f"also_in_train_{'normalised' if norm else 'exact'}"] = {
                    "count": n, "share": n / max(1, len(split.examples)), "examples": samples}
    return out


def audit(task, data_dir: Path) -> dict:
    splits = {}
    for name in ("train", "dev", "test"):
        s = load_split(task, data_dir, name, required=name != "test")
        if s is not None:
            splits[name] = s
    return audit_splits(task, splits)
