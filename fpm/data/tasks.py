"""Fine-tuning task data: GLUE QQP and CLUE TNEWS in their official file layouts.

=====  =====================================================================================
QQP    ``train.tsv``, ``dev.tsv``: ``id qid1 qid2 question1 question2 is_duplicate``;
       ``test.tsv``: ``id question1 question2`` (no label). Tab-separated, header line.
TNEWS  ``train.json``, ``dev.json``: JSON lines ``label, label_desc, sentence, keywords``;
       ``test.json``: ``id, sentence, keywords`` (no label); ``labels.json``: the 15 codes.
=====  =====================================================================================

Every bad row — wrong column count, empty text, a label outside the task's set, a duplicated
id, malformed JSON — is counted with its file and line, never dropped silently; loading stops
with a one-line error when more than ``task.max_bad_fraction`` of a file's rows are bad.
Online, without a local folder, the hub datasets (``nyu-mll/glue``/qqp, ``clue/clue``/tnews)
can be written into this layout once with `fpm data fetch-task` for offline compute nodes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fpm.errors import FpmError

SPLIT_FILES = {"qqp": {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"},
               "tnews": {"train": "train.json", "dev": "dev.json", "test": "test.json"}}
QQP_COLUMNS = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
QQP_TEST_COLUMNS = ["id", "question1", "question2"]


@dataclass
class Example:
    id: str
    texts: tuple[str, ...]  # one entry per task field (QQP: q1, q2; TNEWS: sentence[, keywords])
    label: int | None  # index into task.labels; None on the unlabeled test split
    line: int


@dataclass
class Split:
    task: str
    split: str
    path: Path
    examples: list[Example]
    rows: int
    bad: Counter = field(default_factory=Counter)
    bad_lines: dict[str, list[int]] = field(default_factory=dict)
    labeled: bool = True

    def report(self) -> dict:
        return {"file": str(self.path), "rows": self.rows, "examples": len(self.examples),
                "bad": dict(self.bad), "bad_lines": {k: v[:10] for k, v in self.bad_lines.items()}}


def _bad(split: Split, kind: str, line: int) -> None:
    split.bad[kind] += 1
    split.bad_lines.setdefault(kind, []).append(line)


def _check_fraction(split: Split, max_bad_fraction: float) -> None:
    n_bad = sum(split.bad.values())
    if split.rows and n_bad / split.rows > max_bad_fraction:
        kinds = ", ".join(f"{v} {k} (first at line {split.bad_lines[k][0]})" for k, v in split.bad.items())
        raise FpmError(f"{split.path}: {n_bad} of {split.rows} rows are bad ({kinds}); more than "
                       f"task.max_bad_fraction={max_bad_fraction}")


def _read_lines(path: Path) -> list[tuple[int, str | None]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FpmError(f"{path}: cannot read ({exc.strerror})") from None
    out = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            out.append((i, line.decode("utf-8")))
        except UnicodeDecodeError:
            out.append((i, None))
    return out


def load_qqp(path: Path, split_name: str, task, labels: list[str]) -> Split:
    lines = _read_lines(path)
    if not lines:
        raise FpmError(f"{path}: empty file")
    header_line, header = lines[0]
    cols = (header or "").split("\t")
    test = split_name == "test"
    expected = QQP_TEST_COLUMNS if test else QQP_COLUMNS
    if cols != expected:
        if test and cols == QQP_COLUMNS[:-1]:
            expected = cols
        else:
            raise FpmError(f"{path}:{header_line}: header {cols} is not GLUE QQP's {expected}")
    split = Split("qqp", split_name, path, [], rows=len(lines) - 1, labeled=not test)
    seen: set[str] = set()
    fields = task.fields
    for lineno, text in lines[1:]:
        if text is None:
            _bad(split, "undecodable", lineno)
            continue
        parts = text.split("\t")
        if len(parts) != len(expected):
            _bad(split, "wrong_column_count", lineno)
            continue
        row = dict(zip(expected, parts))
        texts = tuple(row.get(f, "").strip() for f in fields)
        if any(not t for t in texts):
            _bad(split, "empty_text", lineno)
            continue
        label = None
        if not test:
            if row["is_duplicate"].strip() not in labels:
                _bad(split, "label_outside_set", lineno)
                continue
            label = labels.index(row["is_duplicate"].strip())
        rid = row["id"].strip()
        if rid in seen:
            _bad(split, "duplicate_id", lineno)
            continue
        seen.add(rid)
        split.examples.append(Example(rid, texts, label, lineno))
    return split


def load_tnews(path: Path, split_name: str, task, labels: list[str]) -> Split:
    lines = _read_lines(path)
    if lines and lines[0][1] is not None and lines[0][1].lstrip().startswith("["):
        raise FpmError(f"{path}:{lines[0][0]}: a JSON array; CLUE's TNEWS files are JSON lines (one object per "
                       "line): convert it, e.g. jq -c '.[]' FILE")
    test = split_name == "test"
    split = Split("tnews", split_name, path, [], rows=len(lines), labeled=not test)
    seen: set[str] = set()
    for lineno, text in lines:
        if text is None:
            _bad(split, "undecodable", lineno)
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            _bad(split, "bad_json", lineno)
            continue
        if not isinstance(row, dict):
            _bad(split, "bad_json", lineno)
            continue
        texts = []
        for f in task.fields:
            value = row.get(f)
            texts.append(value.strip() if isinstance(value, str) else "")
        # the sentence is required; keywords may legitimately be empty
        if not texts[0]:
            _bad(split, "empty_text", lineno)
            continue
        label = None
        if not test:
            code = str(row.get("label", "")).strip()
            if code not in labels:
                _bad(split, "label_outside_set", lineno)
                continue
            label = labels.index(code)
        rid = str(row.get("id", lineno - 1))
        if rid in seen:
            _bad(split, "duplicate_id", lineno)
            continue
        seen.add(rid)
        split.examples.append(Example(rid, tuple(texts), label, lineno))
    return split


def tnews_label_names(data_dir: Path) -> dict[str, str]:
    path = data_dir / "labels.json"
    if not path.is_file():
        return {}
    names = {}
    for lineno, text in _read_lines(path):
        try:
            row = json.loads(text or "")
            names[str(row["label"])] = row["label_desc"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FpmError(f"{path}:{lineno}: not a {{label, label_desc}} line") from None
    return names


def load_split(task, data_dir: Path | None, split_name: str, *, required: bool = True) -> Split | None:
    """Load one split of ``task`` (a TaskCfg) from ``data_dir`` in the official layout."""
    if data_dir is None:
        raise FpmError(
            f"no --data-dir for {task.name}: compute nodes are often offline, so fetch the data once on a "
            f"machine with internet (`fpm data fetch-task {task.name} --out DIR`) and pass --data-dir DIR")
    data_dir = Path(data_dir)
    path = data_dir / SPLIT_FILES[task.name][split_name]
    if not path.is_file():
        if required:
            raise FpmError(f"{path}: not found ({task.name} expects {', '.join(SPLIT_FILES[task.name].values())})")
        return None
    loader = load_qqp if task.name == "qqp" else load_tnews
    split = loader(path, split_name, task, list(task.labels))
    if task.name == "tnews":
        names = tnews_label_names(data_dir)
        unknown = set(names) - set(task.labels)
        if unknown:
            raise FpmError(f"{data_dir / 'labels.json'}: labels {sorted(unknown)} are not TNEWS's 15 codes")
    _check_fraction(split, task.max_bad_fraction)
    if not split.examples and split_name != "test":  # an empty test split just means no submission file
        what = "holds no rows" if not split.rows else f"has no usable row ({split.rows} rows, all bad)"
        raise FpmError(f"{path}: {what}; the {split_name} split needs examples")
    return split


def fetch_task(task, out: Path) -> None:
    """Download a task from the Hugging Face Hub once and write it in the official layout."""
    try:
        import datasets

        ds = datasets.load_dataset(task.hub_dataset, task.hub_config)
    except Exception as exc:
        raise FpmError(f"cannot fetch {task.hub_dataset}/{task.hub_config} ({type(exc).__name__}); this needs "
                       "internet access") from None
    out.mkdir(parents=True, exist_ok=True)
    if task.name == "qqp":
        for split, name in (("train", "train"), ("validation", "dev"), ("test", "test")):
            rows = ds[split]
            with open(out / SPLIT_FILES["qqp"][name], "w", encoding="utf-8") as fh:
                cols = QQP_TEST_COLUMNS if name == "test" else QQP_COLUMNS
                fh.write("\t".join(cols) + "\n")
                for r in rows:
                    q1, q2 = (r["question1"].replace("\t", " "), r["question2"].replace("\t", " "))
                    if name == "test":
                        fh.write(f"{r['idx']}\t{q1}\t{q2}\n")
                    else:
                        fh.write(f"{r['idx']}\t\t\t{q1}\t{q2}\t{r['label']}\n")
    else:
        names = ds["train"].features["label"].names
        for split, name in (("train", "train"), ("validation", "dev"), ("test", "test")):
            with open(out / SPLIT_FILES["tnews"][name], "w", encoding="utf-8") as fh:
                for r in ds[split]:
                    row = {"sentence": r["sentence"], "keywords": r.get("keywords", "")}
                    if name == "test":
                        row["id"] = str(r["idx"])
                    else:
                        row["label"] = names[r["label"]]
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(out / "labels.json", "w", encoding="utf-8") as fh:
            for code in task.labels:
                fh.write(json.dumps({"label": code, "label_desc": code}) + "\n")


def skipped_rows(split: Split) -> str | None:
    """One line saying which rows of ``split`` were skipped and why (the first line numbers of each
    kind), or ``None`` when none were."""
    if not split.bad:
        return None
    kinds = ", ".join(f"{v} {k} (lines {', '.join(map(str, split.bad_lines[k][:5]))}"
                      f"{'…' if len(split.bad_lines[k]) > 5 else ''})" for k, v in split.bad.items())
    return f"{split.path}: skipped {sum(split.bad.values())} of {split.rows} rows: {kinds}"
