"""Fine-tuning: metrics against hand computations and scikit-learn, task loaders on official layouts
with planted faults, and an end-to-end tiny run (pretrain → finetune → results.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from fpm.config import load_recipe
from fpm.data.synthetic import write_tnews
from fpm.data.tasks import load_split
from fpm.errors import FpmError
from fpm.eval.metrics import classification_metrics

from conftest import run_fpm


def test_binary_metrics_by_hand():
    # 10 examples, positive class 1: TP=3, FP=1, FN=2, TN=4
    y_true = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    m = classification_metrics(y_true, y_pred, 2, positive=1)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["confusion"] == [[4, 1], [2, 3]]


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    for n_classes, positive in ((2, 1), (15, None)):
        y = rng.integers(0, n_classes, 500)
        p = np.where(rng.random(500) < 0.6, y, rng.integers(0, n_classes, 500))
        p[p == 3] = 4  # class 3 is never predicted: its precision is 0, as scikit-learn's zero_division=0
        m = classification_metrics(y, p, n_classes, positive)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
        avg = "binary" if positive is not None else "macro"
        kw = {"pos_label": positive} if positive is not None else {}
        assert m["precision"] == pytest.approx(precision_score(y, p, average=avg, zero_division=0, **kw))
        assert m["recall"] == pytest.approx(recall_score(y, p, average=avg, zero_division=0, **kw))
        assert m["f1"] == pytest.approx(f1_score(y, p, average=avg, zero_division=0, **kw))
        assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
        assert np.array_equal(np.array(m["confusion"]), confusion_matrix(y, p, labels=range(n_classes)))


QQP_HEAD = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"


def test_qqp_loader_counts_every_bad_row_with_its_line(tmp_path):
    rows = [f"{i}\t{2 * i}\t{2 * i + 1}\tWhat is {i}?\tWhich is {i}?\t{i % 2}" for i in range(200)]
    rows[10] = "10\t20\t21\tonly three columns"                 # wrong column count (line 12)
    rows[20] = "20\t40\t41\t   \tWhich is 20?\t0"               # empty text (line 22)
    rows[30] = "30\t60\t61\tWhat?\tWhich?\t2"                   # label outside {0, 1} (line 32)
    rows[40] = "5\t80\t81\tWhat again?\tWhich again?\t1"        # duplicated id 5 (line 42)
    (tmp_path / "dev.tsv").write_text(QQP_HEAD + "\r\n".join(rows) + "\r\n")  # CRLF, as GLUE's dev file
    task = load_recipe("qqp").task.model_copy(update={"max_bad_fraction": 0.05})
    split = load_split(task, tmp_path, "dev")
    assert split.rows == 200 and len(split.examples) == 196
    assert split.bad == {"wrong_column_count": 1, "empty_text": 1, "label_outside_set": 1, "duplicate_id": 1}
    assert split.bad_lines == {"wrong_column_count": [12], "empty_text": [22], "label_outside_set": [32],
                               "duplicate_id": [42]}
    ex = split.examples[0]
    assert ex.texts == ("What is 0?", "Which is 0?") and ex.label == 0 and ex.line == 2
    # too many bad rows stop the run with a one-line error naming the file
    strict = task.model_copy(update={"max_bad_fraction": 0.01})
    with pytest.raises(FpmError, match=r"dev.tsv: 4 of 200 rows are bad .*max_bad_fraction=0.01"):
        load_split(strict, tmp_path, "dev")


def test_qqp_test_split_has_no_labels_and_wrong_headers_are_refused(tmp_path):
    (tmp_path / "test.tsv").write_text("id\tquestion1\tquestion2\n0\tA?\tB?\n1\tC?\tD?\n")
    task = load_recipe("qqp").task
    split = load_split(task, tmp_path, "test")
    assert not split.labeled and [e.label for e in split.examples] == [None, None]
    (tmp_path / "dev.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(FpmError, match=r"dev.tsv:1: header"):
        load_split(task, tmp_path, "dev")
    with pytest.raises(FpmError, match="fetch-task qqp"):
        load_split(task, None, "dev")


def test_tnews_loader_fields_and_faults(tmp_path):
    lines = [json.dumps({"label": "102", "label_desc": "news_entertainment", "sentence": f"标题{i}", "keywords": "甲,乙"},
                        ensure_ascii=False) for i in range(100)]
    lines[3] = '{"label": "105", "sentence": "没有这个类"}'      # 105 is not a TNEWS class
    lines[4] = '{"label": "102", "sentence": ""}'               # empty text
    lines[5] = '{"label": "102", "sentence": "坏'               # malformed JSON
    (tmp_path / "train.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = load_recipe("tnews").task.model_copy(update={"max_bad_fraction": 0.05})
    split = load_split(task, tmp_path, "train")
    assert split.bad == {"label_outside_set": 1, "empty_text": 1, "bad_json": 1}
    assert split.bad_lines == {"label_outside_set": [4], "empty_text": [5], "bad_json": [6]}
    assert split.examples[0].texts == ("标题0",) and split.examples[0].id == "0"
    both = load_recipe("tnews", overrides=["task.fields=[sentence,keywords]", "task.max_bad_fraction=0.05"]).task
    assert load_split(both, tmp_path, "train").examples[0].texts == ("标题0", "甲,乙")


@pytest.mark.slow
def test_end_to_end_tiny_pretrain_finetune_evaluate(tmp_path):
    pre = tmp_path / "pre"
    run_fpm("pretrain", "bert-e-s", "--preset", "tiny", "--out", str(pre), "--max-steps", "60", check=True)
    out = tmp_path / "ft"
    # no --data-dir with the tiny preset: a synthetic QQP task of its own, as the README's first run does
    proc = run_fpm("finetune", "qqp", "--init", str(pre), "--preset", "tiny", "--out", str(out), "--max-steps", "40",
                   "--set", "train.eval_every=20", check=True)
    assert "no --data-dir: writing a synthetic qqp task" in proc.stdout
    data = out / "task"
    assert (data / "train.tsv").is_file() and (data / "test.tsv").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "qqp" and results["split"] == "dev" and results["n_examples"] == 500
    assert {"accuracy", "f1", "precision", "recall"} <= set(results)
    assert results["fields"] == ["question1", "question2"]
    preds = [json.loads(line) for line in (out / "predictions_dev.jsonl").read_text().splitlines()]
    assert len(preds) == 500
    acc = np.mean([p["correct"] for p in preds])
    assert results["accuracy"] == pytest.approx(acc)  # the summary is the predictions file, recomputed
    sub = (out / "QQP.tsv").read_text().splitlines()
    assert sub[0] == "index\tprediction" and len(sub) == 201
    assert "test" not in {json.loads((out / "results.json").read_text())["split"]}
    assert "paper (dev)" in proc.stdout and "GLUE *test* scores" in proc.stdout
    assert (out / "best" / "config.json").is_file() and json.loads((out / "best.json").read_text())["step"] in (20, 40)
    # fpm evaluate reproduces the dev numbers from the saved best model, without training
    ev = tmp_path / "ev"
    run_fpm("evaluate", "qqp", "--model", str(out), "--data-dir", str(data), "--split", "dev", "--preset", "tiny",
            "--out", str(ev), check=True)
    again = json.loads((ev / "results.json").read_text())
    assert again["accuracy"] == pytest.approx(results["accuracy"]) and again["f1"] == pytest.approx(results["f1"])
    run_fpm("evaluate", "qqp", "--model", str(out), "--data-dir", str(data), "--split", "test", "--preset", "tiny",
            "--out", str(ev / "t"), check=True)
    assert (ev / "t" / "QQP.tsv").is_file() and not (ev / "t" / "results.json").exists()


@pytest.mark.slow
def test_tnews_tiny_finetune_writes_clue_submission(tmp_path):
    pre = tmp_path / "pre"
    run_fpm("pretrain", "bert-c", "--preset", "tiny", "--out", str(pre), "--max-steps", "30", check=True)
    data = write_tnews(tmp_path / "tnews", n_train=300, n_dev=100, n_test=20)
    out = tmp_path / "ft"
    run_fpm("finetune", "tnews", "--init", str(pre), "--data-dir", str(data), "--preset", "tiny", "--out", str(out),
            "--max-steps", "20", "--set", "train.eval_every=10", check=True)
    results = json.loads((out / "results.json").read_text())
    assert results["f1_is"] == "macro-F1" and len(results["per_class"]) == 15
    assert np.array(results["confusion"]).sum() == 100
    sub = [json.loads(line) for line in (out / "tnews_predict.json").read_text().splitlines()]
    assert len(sub) == 20 and set(sub[0]) == {"id", "label", "label_desc"} and sub[0]["label_desc"].startswith(("news", "stock"))
