"""`fpm evaluate harness` (fpm.eval.harness): EleutherAI's lm-evaluation-harness on a tiny GPT, equal
to `lm_eval` run directly on the same exported folder, offline on a local task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fpm.errors import FpmError
from fpm.eval import harness
from fpm.rundir import RunDir

from conftest import run_main

ROWS = [("the cat sat on the", ["mat", "moon", "sky"]), ("once upon a", ["time", "table", "tree"]),
        ("the dog ran to the", ["park", "sun", "idea"]), ("she opened the", ["door", "cloud", "seven"]),
        ("a story about a", ["girl", "ocean", "stone"])]
THREADS = {"OMP_NUM_THREADS": "1", "FPM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def local_task(folder: Path) -> Path:
    """A multiple-choice task over a local JSON file: the harness's own task format, offline."""
    folder.mkdir()
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps({"ctx": c, "choices": ch, "gold": 0}) + "\n" for c, ch in ROWS))
    (folder / "tiny_choice.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return folder


def lm_eval_cli(*argv: str) -> None:
    """`lm_eval ARGV` — the harness's own command line (its entry point, in this process: the same
    code without a second interpreter's imports), on one thread as fpm's side runs here."""
    import os

    import torch
    from lm_eval.__main__ import cli_evaluate

    saved, threads = sys.argv, torch.get_num_threads()
    env = {k: os.environ.get(k) for k in THREADS}
    os.environ.update(THREADS)
    sys.argv = ["lm_eval", *argv]
    torch.set_num_threads(1)
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
        torch.set_num_threads(threads)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_model_the_harness_cannot_score_is_refused_on_one_line(tmp_path, monkeypatch):
    with pytest.raises(FpmError, match="not found"):
        harness.model_folder(tmp_path / "none")
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "fpm_recipe.yaml").write_text("model: {family: bert}\n")
    with pytest.raises(FpmError, match="a bert model; the harness scores generative models"):
        harness.model_folder(folder)
    (folder / "fpm_recipe.yaml").write_text("model: {family: gpt}\n")
    with pytest.raises(FpmError, match="no tokenizers form"):
        harness.model_folder(folder)
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FpmError, match=r"pip install 'fpm\[eval\]'"):
        harness.check_installed()


@pytest.mark.e2e
def test_fpm_evaluate_harness_equals_lm_eval_on_the_same_folder_to_the_last_digit(tmp_path):
    run, folder = tmp_path / "run", tmp_path / "hf"
    tasks = local_task(tmp_path / "tasks")
    downstream = ["downstream.task=harness", "downstream.harness_tasks=[tiny_choice]", f"downstream.include_path={tasks}"]
    run_main("pretrain", "epm-x-s", "--preset", "tiny", "--out", str(run), "--max-steps", "10", "--save-every", "10",
             *[a for s in downstream for a in ("--set", s)], check=True)  # its last checkpoint scored beside it
    run_main("export", str(run), "--out", str(folder), check=True)
    ours = tmp_path / "fpm.json"
    run_main("evaluate", "harness", "--model", str(folder), "--tasks", "tiny_choice", "--include-path", str(tasks),
             "--log-samples", "--out", str(ours), env=THREADS, check=True)
    direct = tmp_path / "lm_eval"
    lm_eval_cli("--model", "hf", "--model_args", f"pretrained={folder},dtype=float32", "--tasks", "tiny_choice",
                "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8", "--log_samples",
                "--output_path", str(direct))
    (theirs,) = direct.rglob("results_*.json")
    (their_samples,) = direct.rglob("samples_tiny_choice_*.jsonl")
    mine = json.loads(ours.read_text())
    numbers = {k: v for k, v in json.loads(theirs.read_text())["results"]["tiny_choice"].items() if "," in k}
    assert numbers and {k: mine["results"]["tiny_choice"][k] for k in numbers} == numbers
    want = [json.loads(line) for line in their_samples.read_text().splitlines()]
    got = mine["samples"]["tiny_choice"]
    # every loglikelihood, as lm_eval writes them (str of each value: Python's shortest round-trip repr)
    assert [_text(s["resps"]) for s in got] == [s["resps"] for s in want] and len(got) == len(ROWS)
    # the run directory itself: its newest checkpoint exported once, the same numbers, in run.json
    res = run_main("evaluate", "harness", "--model", str(run), "--tasks", "tiny_choice", "--include-path",
                   str(tasks), env=THREADS, check=True)
    assert "tiny_choice: acc" in res.stderr + res.stdout
    summary = RunDir(run).status()["harness"]["step-00000010"]["tiny_choice"]
    assert {k: summary[k] for k in numbers} == numbers
    assert (run / "harness" / "model-step-00000010" / "config.json").is_file()
    # the downstream job the pretraining started on that checkpoint scored the same (its row in metrics.jsonl)
    from test_downstream import wait_for_results

    (row,) = wait_for_results(run, [10])
    assert row["task"] == "harness" and row["metric"] == "tiny_choice/acc" and row["value"] == numbers["acc,none"]
    assert row["tiny_choice/acc_norm"] == numbers["acc_norm,none"]
    assert not (run / "downstream" / "step-00000010" / "init").exists()


def _text(x):
    return [_text(v) for v in x] if isinstance(x, list) else str(x)
