"""The floors every fine-tuned score must be read against (`fpm baseline`, and beside every
`fpm finetune` and sweep):

* ``majority`` — always the most frequent training label;
* ``tfidf`` — TF-IDF features + logistic regression (scikit-learn), trained on train, scored on dev:
  for English sentence pairs (QQP) word 1-2-grams of each question and the pair features
  |a − b| and a ⊙ b; for Chinese (TNEWS) character 1-3-grams of the input fields joined.

Both write the same ``results.json`` shape as `fpm finetune` (under ``OUT/majority`` and
``OUT/tfidf``) and a summary ``OUT/floors.json``. The fields used are recorded with every number.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fpm.rundir import FLOORS
from fpm.data.tasks import Split


def _texts(split: Split, i: int) -> list[str]:
    return [e.texts[i] if i < len(e.texts) else "" for e in split.examples]


def majority_probs(train: Split, n: int, num_labels: int) -> np.ndarray:
    counts = np.bincount([e.label for e in train.examples], minlength=num_labels)
    probs = np.zeros((n, num_labels))
    probs[:, int(np.argmax(counts))] = 1.0
    return probs


def tfidf_model(task, train: Split):
    """A fitted (features, classifier) pair for the task's inputs."""
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    y = np.array([e.label for e in train.examples])
    if task.language == "en" and len(task.fields) == 2:
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, lowercase=True, sublinear_tf=True)
        vec.fit(_texts(train, 0) + _texts(train, 1))

        def feats(split: Split):
            a, b = vec.transform(_texts(split, 0)), vec.transform(_texts(split, 1))
            return sparse.hstack([abs(a - b), a.multiply(b)]).tocsr()
    else:
        analyzer = "char" if task.language == "zh" else "word"
        ngrams = (1, 3) if task.language == "zh" else (1, 2)
        vec = TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, min_df=2, sublinear_tf=True)

        def joined(split: Split):
            return [" ".join(t for t in e.texts if t) for e in split.examples]

        vec.fit(joined(train))

        def feats(split: Split):
            return vec.transform(joined(split))
    clf = LogisticRegression(max_iter=2000, C=4.0)
    clf.fit(feats(train), y)
    return feats, clf


def floors(task, splits: dict[str, Split], out: Path, names: dict[str, str] | None = None) -> dict:
    """Compute both floors on dev (and test submission files), write their results; returns floors.json."""
    from fpm.eval.results import write_results

    train, dev = splits["train"], splits["dev"]
    summary = {"fields": list(task.fields), "split": "dev"}
    for name in ("majority", "tfidf"):
        t0 = time.time()
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        if name == "majority":
            dev_probs = majority_probs(train, len(dev.examples), task.num_labels)
            predict = lambda s: majority_probs(train, len(s.examples), task.num_labels)  # noqa: E731
        else:
            feats, clf = tfidf_model(task, train)
            dev_probs = clf.predict_proba(feats(dev))
            predict = lambda s: clf.predict_proba(feats(s))  # noqa: E731
        recipe_like = _RecipeView(task)
        res = write_results(target, recipe_like, dev, dev_probs, {"model": name, "wall_s": time.time() - t0},
                            names or {})
        if splits.get("test") is not None and splits["test"].examples:
            write_results(target, recipe_like, splits["test"], predict(splits["test"]), {"model": name}, names or {})
        summary[name] = {k: res[k] for k in ("accuracy", "precision", "recall", "f1", "macro_f1", "n_examples")}
    (out / FLOORS).write_text(json.dumps(summary, indent=1))
    return summary


class _RecipeView:
    """The part of a FinetuneRecipe that write_results reads."""

    def __init__(self, task):
        self.task = task
