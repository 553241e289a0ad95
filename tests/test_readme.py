"""The README's first run works as written: its block, line by line, in a fresh folder that has only
the installed `.venv` (as a fresh clone after `make install` has), then the files it promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_fpm


def first_run_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### A first run, step by step"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_first_run_block_is_what_the_readme_says_it_is():
    lines = first_run_block()
    assert lines[0].startswith("source .venv/bin/activate")
    assert [line.split()[1] for line in lines[1:]] == ["pretrain", "export", "finetune", "evaluate"]
    assert all("DIR" not in line and "<" not in line for line in lines)  # nothing to fill in


def fresh_folder_with_the_venv(folder: Path) -> None:
    """``.venv`` as `make install` leaves it: this interpreter's venv, or one whose activate puts it first."""
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").is_file() and sys.prefix != sys.base_prefix:
        (folder / ".venv").symlink_to(venv)
    else:  # not inside a venv: an activate script that puts this interpreter's bin first
        (folder / ".venv" / "bin").mkdir(parents=True)
        (folder / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')


@pytest.mark.system
def test_the_first_run_runs_as_written_in_a_fresh_folder(tmp_path):
    fresh_folder_with_the_venv(tmp_path)
    script = "set -e\n" + "\n".join(first_run_block()) + "\n"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = tmp_path / "runs"
    # pretraining: a run directory with its checkpoints; export: a folder plain transformers loads
    assert (runs / "tiny-bert" / "checkpoints" / "latest").is_file()
    from transformers import AutoModelForPreTraining

    AutoModelForPreTraining.from_pretrained(str(runs / "tiny-bert-hf"))
    # fine-tuning without --data-dir wrote its synthetic task and said so
    out = runs / "tiny-qqp"
    assert "no --data-dir: writing a synthetic qqp task" in proc.stdout + proc.stderr
    assert {"train.tsv", "dev.tsv", "test.tsv"} <= {p.name for p in (out / "task").iterdir()}
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "qqp" and results["split"] == "dev" and results["n_examples"] == 500
    assert results["fields"] == ["question1", "question2"]
    preds = [json.loads(line) for line in (out / "predictions_dev.jsonl").read_text().splitlines()]
    assert len(preds) == 500
    assert results["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 500)  # the predictions, recounted
    sub = (out / "QQP.tsv").read_text().splitlines()
    assert sub[0] == "index\tprediction" and len(sub) == 201
    assert (out / "best" / "config.json").is_file()
    # the tiny preset learns the synthetic task: well above the majority class (the floors beside it)
    majority = results["floors"]["majority"]["accuracy"]
    assert results["accuracy"] > majority + 0.15, (results["accuracy"], majority)
    # fpm evaluate, without training, reproduces the dev numbers from the kept model
    again = json.loads((runs / "tiny-qqp-dev" / "results.json").read_text())
    assert again["accuracy"] == pytest.approx(results["accuracy"]) and again["f1"] == pytest.approx(results["f1"])
    assert "paper (dev)" in proc.stdout and "GLUE *test* scores" in proc.stdout
    run_fpm("evaluate", "qqp", "--model", str(out), "--data-dir", str(out / "task"), "--split", "test", "--preset",
            "tiny", "--out", str(tmp_path / "test-split"), check=True)
    assert (tmp_path / "test-split" / "QQP.tsv").is_file() and not (tmp_path / "test-split" / "results.json").exists()
