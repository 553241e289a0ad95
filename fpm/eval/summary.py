"""The console table closing `fpm finetune` and `fpm evaluate`: the model beside its floors."""

from __future__ import annotations

from pathlib import Path

from fpm.config.schema import FinetuneRecipe
from fpm.console import console, info
from fpm.paper import TNEWS_ALBERT_XXLARGE_TEST_ACCURACY, TNEWS_BERT_C_ACCURACY


def summary(results: dict, recipe: FinetuneRecipe, data_dir: Path, floors: dict | None = None,
            audit: dict | None = None) -> None:
    """The closing table: the model beside its floors (same split, same inputs), with the paper only
    where the comparison is like for like, and what the data audit says about the split."""
    from rich.table import Table

    task = recipe.task
    t = Table(title=f"{task.name} {results['split']}: {results['n_examples']:,} examples, input "
                    f"{' + '.join(results['fields'])}")
    t.add_column("")
    for k in ("accuracy", "precision", "recall", "f1"):
        t.add_column(k if k != "f1" else results["f1_is"], justify="right")
    t.add_row("fpm (best checkpoint)", *(f"{100 * results[k]:.2f}" for k in ("accuracy", "precision", "recall", "f1")))
    notes = []
    if floors:
        same = floors.get("fields") == results["fields"]
        for name, label in (("majority", "floor: majority class"), ("tfidf", "floor: TF-IDF + logistic regression")):
            t.add_row(label + ("" if same else f" (input {'+'.join(floors['fields'])}: not comparable)"),
                      *(f"{100 * floors[name][k]:.2f}" for k in ("accuracy", "precision", "recall", "f1")))
        gap = results["accuracy"] - floors["tfidf"]["accuracy"]
        if gap <= 0:
            notes.append(f"the model does NOT beat the TF-IDF floor: accuracy {100 * results['accuracy']:.2f} vs "
                         f"{100 * floors['tfidf']['accuracy']:.2f}")
        else:
            notes.append(f"the model beats the TF-IDF floor by {100 * gap:.2f} accuracy points")
    paper = recipe.paper or {}
    if paper:
        same_split = paper.get("split") == results["split"]
        row = [f"{paper[k]:.2f}" if k in paper else "-" for k in ("accuracy", "precision", "recall", "f1")]
        t.add_row(f"paper ({'dev' if same_split else paper.get('split', 'split unstated')})", *row)
        if task.name == "qqp":
            notes.append("the paper's row is Table 3 (BERT-E-L, 70 layers, GLUE QQP dev, one run); it compares "
                         "only if --data-dir holds GLUE QQP's own dev split")
            notes.append("Table 1's leaderboard figures are GLUE *test* scores: not comparable with a dev score")
        else:
            notes.append(f"the paper does not say which split its {TNEWS_BERT_C_ACCURACY}% TNEWS accuracy is on, and "
                         f"sets it beside ALBERT-xxlarge's {TNEWS_ALBERT_XXLARGE_TEST_ACCURACY}%, a CLUE *test* score: "
                         "neither compares like for like")
    pos_rate = None
    if task.positive_label is not None:
        support = results["per_class"][task.positive_label]["support"]
        pos_rate = support / max(1, results["n_examples"])
        notes.append(f"class {task.positive_label} is {100 * pos_rate:.1f}% of this dev set (GLUE QQP's: about 37%)")
    if audit and "dev" in audit["splits"] and "also_in_train_normalised" in audit["splits"]["dev"]:
        dv = audit["splits"]["dev"]
        notes.append(f"audit: {dv['also_in_train_normalised']['count']:,} dev {audit['unit']}s "
                     f"({100 * dv['also_in_train_normalised']['share']:.1f}%) also occur in train (normalised; exact: "
                     f"{dv['also_in_train_exact']['count']:,}); majority class share {100 * (dv['majority_share'] or 0):.1f}%")
    console().print(t)
    for n in notes:
        info(f"  note: {n}")
    info(f"  data: {data_dir}; results in results.json")
