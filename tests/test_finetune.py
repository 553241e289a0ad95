"""Fine-tuning: metrics against hand computations and scikit-learn, task loaders on official layouts
with planted faults, length-grouped batches, prediction in length order, a TNEWS run end to end
(the README's QQP first run is tests/test_readme.py)."""

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

from conftest import run_main


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


@pytest.mark.e2e
def test_tnews_tiny_finetune_writes_clue_submission(tmp_path):
    pre = tmp_path / "pre"
    run_main("pretrain", "bert-c", "--preset", "tiny", "--out", str(pre), "--max-steps", "30", check=True)
    data = write_tnews(tmp_path / "tnews", n_train=300, n_dev=100, n_test=20)
    out = tmp_path / "ft"
    run_main("finetune", "tnews", "--init", str(pre), "--data-dir", str(data), "--preset", "tiny", "--out", str(out),
            "--max-steps", "20", "--set", "train.eval_every=10", check=True)
    results = json.loads((out / "results.json").read_text())
    assert results["f1_is"] == "macro-F1" and len(results["per_class"]) == 15
    # the tiny preset's precision, given, recorded beside the scores (not in place of the class precision)
    assert results["train_precision"]["precision"] == "fp32" and results["train_precision"]["reason"] == "given: fp32"
    assert 0.0 <= results["precision"] <= 1.0
    assert np.array(results["confusion"]).sum() == 100
    sub = [json.loads(line) for line in (out / "tnews_predict.json").read_text().splitlines()]
    assert len(sub) == 20 and set(sub[0]) == {"id", "label", "label_desc"} and sub[0]["label_desc"].startswith(("news", "stock"))


def test_length_grouping_reads_every_example_once_per_epoch_in_batches_of_similar_length():
    from fpm.data.pairs import MEGA_BATCHES, TaskDataset, length_grouped_order

    rng = np.random.default_rng(0)
    n, batch, L = 1000, 24, 64  # 1000 = 41 x 24 + 16: global batches straddle the epochs
    lens = rng.integers(3, L + 1, n)
    mask = (np.arange(L)[None, :] < lens[:, None]).astype(np.int64)
    feats = {"input_ids": mask * 7, "token_type_ids": np.zeros_like(mask), "attention_mask": mask}
    ds = TaskDataset(feats, np.arange(n) % 2, seed=3, group_by=batch)
    plain = TaskDataset(feats, np.arange(n) % 2, seed=3)
    for epoch in range(3):  # every example exactly once per epoch, a different order each epoch
        read = [ds.index(epoch * n + i) for i in range(n)]
        assert sorted(read) == list(range(n))
        assert read != [ds.index(((epoch + 1) % 3) * n + i) for i in range(n)]
    # a pure function of (seed, epoch, position): a fresh dataset (a resumed process) reads the same
    again = TaskDataset(feats, np.arange(n) % 2, seed=3, group_by=batch)
    assert [again.index(g) for g in range(2 * n - 5, 2 * n + 5)] == [ds.index(g) for g in range(2 * n - 5, 2 * n + 5)]
    assert not np.array_equal(length_grouped_order(n, lens, batch, 4, 0), length_grouped_order(n, lens, batch, 3, 0))

    def padded_positions(d, epochs=3):  # what the global batches cost once padded to their longest row
        steps = epochs * n // batch
        return sum(batch * max(lens[d.index(g)] for g in range(s * batch, (s + 1) * batch)) for s in range(steps))

    real = sum(lens[ds.index(g)] for g in range(3 * n // batch * batch))
    assert padded_positions(ds) < 0.7 * padded_positions(plain)
    assert padded_positions(ds) < 1.15 * real  # in every epoch, not only the first
    # batches are shuffled within each mega-batch: not sorted from long to short
    firsts = [lens[ds.index(s)] for s in range(0, min(n, batch * MEGA_BATCHES), batch)]
    assert firsts != sorted(firsts, reverse=True)


def test_a_micro_batch_is_cut_to_its_longest_row_rounded_to_eight():
    from fpm.data.pairs import TaskDataset

    L = 64
    lens = np.array([5, 11, 9])
    mask = (np.arange(L)[None, :] < lens[:, None]).astype(np.int64)
    feats = {"input_ids": mask * 7, "token_type_ids": np.zeros_like(mask), "attention_mask": mask}
    ds = TaskDataset(feats, np.array([0, 1, 0]), seed=0, group_by=3)
    batch = ds.collate([ds[g] for g in range(3)])
    assert batch["input_ids"].shape == (3, 16) and batch["labels"].shape == (3,)
    assert int(batch["attention_mask"].sum()) == 25  # nothing real was cut


def test_prediction_in_length_order_returns_the_full_padding_probabilities_in_input_order():
    from transformers import BertConfig, BertForSequenceClassification

    from fpm.eval.predict import predict

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=3))
    rng = np.random.default_rng(1)
    L, n = 40, 37
    lens = rng.integers(2, L + 1, n)
    mask = (np.arange(L)[None, :] < lens[:, None]).astype(np.int64)
    feats = {"input_ids": rng.integers(1, 100, (n, L)) * mask, "token_type_ids": np.zeros_like(mask),
             "attention_mask": mask}
    with torch.no_grad():
        full = torch.softmax(model.eval()(**{k: torch.as_tensor(v) for k, v in feats.items()}).logits, -1).numpy()
    got = predict(model, feats, batch_size=8)
    assert np.allclose(got, full, atol=1e-5)


@pytest.mark.e2e
def test_length_grouped_fine_tuning_resumes_exactly_after_sigkill(tmp_path):
    """A fine-tuning run killed after its step-8 checkpoint and rerun logs the same losses, bit for bit,
    as an uninterrupted one, across epoch boundaries of the length-grouped order (200 examples,
    batches of 32: a new epoch every 6.25 steps)."""
    import subprocess
    import sys

    from fpm.data.synthetic import write_qqp
    from fpm.engine.metrics import read_metrics

    from conftest import sigkill_after_checkpoint

    pre = tmp_path / "pre"
    run_main("pretrain", "bert-e-s", "--preset", "tiny", "--out", str(pre), "--max-steps", "2", check=True)
    data = write_qqp(tmp_path / "task", n_train=200, n_dev=40, n_test=5)
    args = ["finetune", "qqp", "--init", str(pre), "--data-dir", str(data), "--preset", "tiny", "--max-steps", "24",
            "--no-floors", "--set", "train.save_every=8", "--set", "train.log_every=1", "--set", "train.eval_every=1000"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_main(*args, "--out", str(a), check=True)
    proc = subprocess.Popen([sys.executable, "-m", "fpm", *args, "--out", str(b)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_after_checkpoint(proc, b, "step-00000008")
    assert "resumed from" in run_main(*args, "--out", str(b), check=True).stdout
    la = [m["loss"] for m in read_metrics(a) if "loss" in m]
    lb = [m["loss"] for m in read_metrics(b) if "loss" in m]
    assert len(la) == 24 and la == lb
    assert json.loads((a / "results.json").read_text())["accuracy"] == json.loads((b / "results.json").read_text())["accuracy"]


def test_length_grouping_does_not_sort_rows_of_one_padded_length_by_their_exact_length():
    """Rows padded to the same length stay in random order: exact sorting made batches of one class
    where the length goes with the label (here: label = length parity), and fine-tuning stalled."""
    from fpm.data.pairs import TaskDataset

    rng = np.random.default_rng(1)
    n, batch, L = 512, 32, 32
    lens = rng.integers(9, 17, n)  # one padded length: 16
    mask = (np.arange(L)[None, :] < lens[:, None]).astype(np.int64)
    labels = lens % 2
    ds = TaskDataset({"input_ids": mask, "token_type_ids": 0 * mask, "attention_mask": mask}, labels, 0, group_by=batch)
    shares = [labels[[ds.index(g) for g in range(s, s + batch)]].mean() for s in range(0, n, batch)]
    assert all(0.2 < x < 0.8 for x in shares), shares
