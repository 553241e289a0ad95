"""A run directory is self-contained: killed with SIGKILL after its first checkpoint, moved to
another path, its data folder gone, it still exports and fine-tunes from another working
directory — with the vocabulary it trained with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fpm.data.synthetic import write_qqp
from fpm.rundir import RunDir

from conftest import run_main
from fixtures import prepared

pytestmark = pytest.mark.e2e


def test_a_killed_and_moved_run_exports_and_finetunes_from_elsewhere(tmp_path):
    _, data, _ = prepared(tmp_path, "bert", 600)
    vocab = (data / "tokenizer" / "vocab.txt").read_text()
    # started as a user would, with paths relative to the working directory
    proc = subprocess.Popen([sys.executable, "-m", "fpm", "pretrain", "bert-e-l", "--preset", "tiny", "--data",
                             data.name, "--out", "run", "--max-steps", "1000", "--save-every", "2"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    latest, t0 = tmp_path / "run" / "checkpoints" / "latest", time.time()
    while not latest.is_file():
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rd = RunDir(tmp_path / "run")
    assert rd.status()["status"] == "running"  # it never finished
    assert (rd.tokenizer / "vocab.txt").read_text() == vocab and rd.data_manifest.is_file()

    moved = tmp_path / "elsewhere" / "run-moved"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "run"), moved)
    # the data folder is gone; another folder at the old relative path holds a different vocabulary
    shutil.rmtree(data)
    other = tmp_path / "cwd"
    (other / data.name / "tokenizer").mkdir(parents=True)
    (other / data.name / "tokenizer" / "vocab.txt").write_text("\n".join(reversed(vocab.splitlines())) + "\n")

    hf = tmp_path / "hf"
    proc = run_main("export", str(moved), "--out", str(hf), cwd=other, check=True)
    assert (hf / "fpm_tokenizer" / "vocab.txt").read_text() == vocab
    task = write_qqp(tmp_path / "qqp", 64, 32, 8)
    ft = tmp_path / "ft"
    run_main("finetune", "qqp", "--preset", "tiny", "--init", str(moved), "--data-dir", str(task), "--out", str(ft),
            "--max-steps", "2", "--no-floors", cwd=other, check=True)
    results = json.loads(RunDir(ft).results.read_text())
    assert results["n_examples"] == 32
    assert (ft / "best" / "fpm_tokenizer" / "vocab.txt").read_text() == vocab
