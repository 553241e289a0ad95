"""Floors and audits on constructed data: known duplicates, known label counts, floors by hand and
by scikit-learn directly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fpm.eval.audit import audit
from fpm.eval.floors import floors
from fpm.config import load_recipe
from fpm.data.synthetic import write_tnews
from fpm.data.tasks import load_split


HEAD = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"


def write_qqp(folder, train_rows, dev_rows):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("dev", dev_rows)):
        text = HEAD + "".join(f"{i}\t\t\t{a}\t{b}\t{y}\n" for i, (a, b, y) in enumerate(rows))
        (folder / f"{name}.tsv").write_text(text)
    return folder


def test_audit_counts_known_duplicates_and_labels(tmp_path):
    train = [(f"How do I learn {w}?", f"What is the best way to learn {w}?", int(i % 4 == 0))
             for i, w in enumerate(["python", "rust", "go", "java", "swift", "kotlin", "scala", "perl"])]
    train.append(("What is the best way to learn rust?", "How do I learn rust?", 0))  # the same pair, swapped
    train.append(("how do i learn PYTHON", "What is the best way to learn python", 1))  # same after normalising
    dev = [("How do I learn go?", "What is the best way to learn go?", 1),          # exact train pair
           ("What is the best way to learn java?", "How do I learn java?", 0),      # swapped: same unordered pair
           ("HOW do I learn swift ?!", "What is the best way to learn swift", 1),   # normalised only
           ("How do I cook rice?", "How do I boil rice?", 0)]                       # new
    data = write_qqp(tmp_path, train, dev)
    rep = audit(load_recipe("qqp").task, data)
    tr, dv = rep["splits"]["train"], rep["splits"]["dev"]
    assert tr["labels"] == {"0": 7, "1": 3} and dv["labels"] == {"0": 2, "1": 2}
    assert tr["duplicates_within_exact"]["count"] == 1 and tr["duplicates_within_normalised"]["count"] == 2
    assert dv["also_in_train_exact"]["count"] == 2 and dv["also_in_train_normalised"]["count"] == 3
    assert dv["also_in_train_normalised"]["share"] == pytest.approx(0.75)
    assert dv["length_question1"]["max"] == 8 and rep["unit"] == "unordered question pair"


def test_majority_floor_by_hand(tmp_path):
    train = [(f"q{i} a", f"q{i} b", 1 if i < 7 else 0) for i in range(10)]  # 7 duplicates: majority is 1
    dev = [(f"d{i} a", f"d{i} b", 1 if i < 2 else 0) for i in range(5)]    # 2 of 5 are duplicates
    data = write_qqp(tmp_path / "d", train, dev)
    task = load_recipe("qqp").task
    splits = {n: load_split(task, data, n, required=n != "test") for n in ("train", "dev", "test")}
    f = floors(task, splits, tmp_path / "out")
    m = f["majority"]
    assert m["accuracy"] == pytest.approx(2 / 5)      # always "duplicate": right on the 2 duplicates
    assert m["precision"] == pytest.approx(2 / 5) and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 * 0.4 / 1.4)
    saved = json.loads((tmp_path / "out" / "majority" / "results.json").read_text())
    assert {"task", "split", "n_examples", "accuracy", "f1", "precision", "recall", "fields"} <= set(saved)
    assert saved["fields"] == ["question1", "question2"] and saved["split"] == "dev"


@pytest.mark.parametrize("fields", [["sentence"], ["sentence", "keywords"]])
def test_tfidf_floor_equals_scikit_learn_directly(tmp_path, fields):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    data = write_tnews(tmp_path / "tnews", n_train=600, n_dev=200, n_test=0)
    task = load_recipe("tnews", overrides=[f"task.fields=[{','.join(fields)}]"]).task
    splits = {n: load_split(task, data, n, required=n != "test") for n in ("train", "dev", "test")}
    f = floors(task, splits, tmp_path / "out")
    rows = {n: [json.loads(line) for line in (data / f"{n}.json").read_text().splitlines()] for n in ("train", "dev")}

    def text(r):
        return " ".join(r[k] for k in fields if r.get(k))

    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    x_train = vec.fit_transform([text(r) for r in rows["train"]])
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(x_train, [r["label"] for r in rows["train"]])
    pred = clf.predict(vec.transform([text(r) for r in rows["dev"]]))
    acc = np.mean(pred == np.array([r["label"] for r in rows["dev"]]))
    assert f["tfidf"]["accuracy"] == pytest.approx(acc)
    assert f["fields"] == fields
    assert f["tfidf"]["accuracy"] > f["majority"]["accuracy"] + 0.2


def test_cli_baseline_and_audit(tmp_path, cli):
    data = write_tnews(tmp_path / "tnews", n_train=300, n_dev=100, n_test=20)
    proc = cli("baseline", "tnews", "--data-dir", str(data), "--out", str(tmp_path / "b"), "--set",
               "task.fields=[sentence,keywords]", check=True)
    assert "input sentence + keywords" in proc.stdout
    res = json.loads((tmp_path / "b" / "tfidf" / "results.json").read_text())
    assert res["fields"] == ["sentence", "keywords"] and res["f1_is"] == "macro-F1"
    assert (tmp_path / "b" / "tfidf" / "tnews_predict.json").is_file()
    proc = cli("data", "audit", "tnews", "--data-dir", str(data), "--out", str(tmp_path / "a"), check=True)
    rep = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert sum(rep["splits"]["dev"]["labels"].values()) == 100 and "also in train" in proc.stdout
