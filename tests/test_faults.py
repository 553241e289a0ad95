"""Fault injection: every bad input and fault a user can meet ends in a clean exit and loses nothing.

``ROWS`` is the table (also in the README, kept in step by a test): each row makes its fault in a
fresh folder, runs the real command line as a user would, and asserts the exit code, a one-line
``error:`` message naming the file, line or key, no traceback anywhere, and — where there was
something to lose — that it was not lost (the last good checkpoint intact and resumable, no half
shard left behind). Signals to the whole process group are in test_pretrain.py, SLURM's in
test_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from fpm.data.synthetic import write_corpus, write_qqp, write_tnews

from conftest import ROOT, run_fpm, run_main
from fixtures import prepared


PRETRAIN = ["pretrain", "bert-e-l", "--preset", "tiny"]
SHORT = ["--max-steps", "6", "--save-every", "2", "--set", "train.log_every=1"]


@dataclass
class Row:
    fault: str                      # what the user did or what happened (README column 1)
    code: int                       # expected exit code
    says: str                       # expected in the one-line message
    make: Callable[[Path, dict], list[str]]  # builds the fault in a folder, returns fpm's arguments
    check: Callable[[Path, dict], None] | None = None  # nothing lost


def _data_copy(tmp: Path, ctx: dict) -> Path:
    data = tmp / "data"
    shutil.copytree(ctx["data"], data)
    return data


def _truncate(suffix: str, keep: int):
    def make(tmp: Path, ctx: dict) -> list[str]:
        data = _data_copy(tmp, ctx)
        path = data / f"shard_00000{suffix}"
        path.write_bytes(path.read_bytes()[:keep])
        return [*PRETRAIN, "--data", str(data), "--out", str(tmp / "run"), "--max-steps", "2"]
    return make


def _damaged_vocabulary(tmp: Path, ctx: dict) -> list[str]:
    data = _data_copy(tmp, ctx)
    path = data / "tokenizer" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [*PRETRAIN, "--data", str(data), "--out", str(tmp / "run"), "--max-steps", "2"]


def _overwrite_bin(byte: int, command: str):
    def make(tmp: Path, ctx: dict) -> list[str]:
        data = _data_copy(tmp, ctx)
        path = data / "shard_00000.bin"
        path.write_bytes(bytes([byte]) * path.stat().st_size)  # same size: only the contents changed
        if command == "verify":
            return ["data", "verify", str(data)]
        return [*PRETRAIN, "--data", str(data), "--out", str(tmp / "run"), "--max-steps", "2"]
    return make


def _qqp_header_only(tmp: Path, ctx: dict) -> list[str]:
    task = write_qqp(tmp / "qqp", 20, 10, 5)
    (task / "train.tsv").write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n")
    return ["finetune", "qqp", "--preset", "tiny", "--init", str(ctx["run"]), "--data-dir", str(task),
            "--out", str(tmp / "ft")]


def _tnews_json_array(tmp: Path, ctx: dict) -> list[str]:
    task = write_tnews(tmp / "tnews", 20, 10, 5)
    rows = [json.loads(line) for line in (task / "train.json").read_text().splitlines()]
    (task / "train.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return ["baseline", "tnews", "--data-dir", str(task), "--out", str(tmp / "floors")]


def _read_only_out(tmp: Path, ctx: dict) -> list[str]:
    ro = tmp / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: a read-only file system it is
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
        ctx["unmount"].append(ro)
    else:
        ro.chmod(0o555)
    return [*PRETRAIN, "--data", str(ctx["data"]), "--out", str(ro / "run"), "--max-steps", "2"]


def _small_disk(path: Path, ctx: dict, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    ctx["unmount"].append(path)


def _full_disk_prepare(tmp: Path, ctx: dict) -> list[str]:
    corpus = write_corpus(tmp / "corpus.txt", "en", 3000)
    _small_disk(tmp / "disk", ctx, "320k")  # room for the vocabulary, not for the shards
    return ["data", "prepare", "bert-e-l", "--preset", "tiny", "--input", str(corpus), "--out",
            str(tmp / "disk" / "data"), "--workers", "0"]


def _no_half_shard(tmp: Path, ctx: dict) -> None:
    data = tmp / "disk" / "data"
    assert not (data / "manifest.json").exists()
    assert not list(data.glob("*.tmp")), list(data.iterdir())  # the partial shard was removed
    progress = json.loads((data / "progress.json").read_text()) if (data / "progress.json").is_file() else {"shards": []}
    for s in progress["shards"]:  # a shard under its final name is whole
        assert (data / f"{s['name']}.bin").stat().st_size == s["files"][f"{s['name']}.bin"][0]


def _full_disk_pretrain(tmp: Path, ctx: dict) -> list[str]:
    # room for the run's small files and one checkpoint, not for the second
    _small_disk(tmp / "disk", ctx, f"{int(ctx['ckpt_bytes'] * 1.6) // 1024}k")
    return [*PRETRAIN, "--data", str(ctx["data"]), "--out", str(tmp / "disk" / "run"), *SHORT]


def _full_disk_resumes(tmp: Path, ctx: dict) -> None:
    run = tmp / "disk" / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert not (run / "checkpoints" / "step-00000004").exists()  # the partial save was removed
    subprocess.run(["mount", "-o", "remount,size=64m", str(tmp / "disk")], check=True)  # room made
    proc = run_fpm(*PRETRAIN, "--data", str(ctx["data"]), "--out", str(run), *SHORT)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-2000:]
    assert _weights(run) .keys() == _weights(ctx["run"]).keys()
    assert all(torch.equal(a, b) for a, b in zip(_weights(run).values(), _weights(ctx["run"]).values()))


def _weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def _second_writer(tmp: Path, ctx: dict) -> list[str]:
    run = tmp / "run"
    first = subprocess.Popen([sys.executable, "-m", "fpm", *PRETRAIN, "--data", str(ctx["data"]), "--out", str(run),
                              "--max-steps", "100000", "--save-every", "100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx["kill"].append(first)
    t0 = time.time()
    while not (run / "recipe.yaml").is_file():  # the first run holds the lock and has started
        assert first.poll() is None and time.time() - t0 < 120
        time.sleep(0.1)
    ctx["holder"] = f"PID {first.pid} on {socket.gethostname()}"
    return [*PRETRAIN, "--data", str(ctx["data"]), "--out", str(run), "--max-steps", "2"]


def _first_writer_untouched(tmp: Path, ctx: dict) -> None:
    first = ctx["kill"][-1]
    assert first.poll() is None  # the first run goes on


def _evaluate_pretraining_run(tmp: Path, ctx: dict) -> list[str]:
    task = write_qqp(tmp / "qqp", 20, 10, 5)
    return ["evaluate", "qqp", "--model", str(ctx["run"]), "--data-dir", str(task), "--out", str(tmp / "eval")]


def _export_missing_tag(tmp: Path, ctx: dict) -> list[str]:
    return ["export", str(ctx["run"]), "--out", str(tmp / "hf"), "--tag", "step-00000999"]


def _tokenizer_input(content: bytes):
    def make(tmp: Path, ctx: dict) -> list[str]:
        (tmp / "corpus.txt").write_bytes(content)
        return ["data", "train-tokenizer", "--kind", "wordpiece", "--input", str(tmp / "corpus.txt"),
                "--vocab-size", "500", "--out", str(tmp / "vocab")]
    return make


def _empty_corpus(tmp: Path, ctx: dict) -> list[str]:
    (tmp / "corpus.txt").write_text("")
    return ["data", "prepare", "bert-e-l", "--preset", "tiny", "--input", str(tmp / "corpus.txt"),
            "--out", str(tmp / "data"), "--workers", "0"]


def _no_files_written(what: str):
    def check(tmp: Path, ctx: dict) -> None:
        assert not (tmp / what).exists() or not any((tmp / what).iterdir())
    return check


USAGE = [  # (arguments, what the message says)
    (["pretrain", "bert-e-l", "--max-steps", "five"], "Invalid value for '--max-steps'"),
    (["pretrain", "bert-e-l", "--max-step", "5"], "No such option: --max-step"),
    (["pretrain", "bert-e-l", "--seed", "x"], "Invalid value for '--seed'"),
    (["pretrain"], "Missing argument 'recipe'"),
    (["pretrian"], "No such command 'pretrian'"),
    (["finetune", "qqp"], "Missing option '--init'"),
    (["data", "prepare", "bert-e-l", "--workers", "-"], "Invalid value for '--workers'"),
    (["plan", "--nodes", "two"], "Invalid value for '--nodes'"),
]

ROWS = {
    "truncated .idx": Row("a shard's .idx truncated", 2, "shard_00000.idx", _truncate(".idx", 100)),
    "truncated .ws": Row("a shard's .ws truncated", 2, "shard_00000.ws", _truncate(".ws", 10)),
    "overwritten .bin (load)": Row("a .bin overwritten with other bytes of the same size (ids outside the vocabulary)",
                                   2, "shard_00000.bin: does not match the checksum", _overwrite_bin(0xFF, "pretrain")),
    "overwritten .bin (verify)": Row("a .bin overwritten with in-vocabulary bytes, `fpm data verify`", 2,
                                     "shard_00000.bin: does not match the checksum", _overwrite_bin(0, "verify")),
    "damaged vocabulary": Row("a prepared folder's tokenizer.json cut in half", 2,
                              "tokenizer: cannot load the vocabulary", _damaged_vocabulary),
    "qqp header only": Row("a QQP train.tsv with only the header", 2, "train.tsv: holds no rows", _qqp_header_only),
    "tnews json array": Row("a TNEWS file given as one JSON array", 2, "train.json:1: a JSON array", _tnews_json_array),
    "read-only out": Row("a read-only --out", 74, "/ro/run: ", _read_only_out),
    "full disk (prepare)": Row("the disk fills during `fpm data prepare`", 74, "/disk/data: the disk is full",
                               _full_disk_prepare, _no_half_shard),
    "full disk (pretrain)": Row("the disk fills while a checkpoint is saved", 74,
                                "step-00000004: the checkpoint of step 4 could not be written (the disk is full)",
                                _full_disk_pretrain, _full_disk_resumes),
    "second writer": Row("a second `fpm pretrain` on the same --out", 2, "is in use by fpm pretrain bert-e-l",
                         _second_writer, _first_writer_untouched),
    "evaluate a pretraining run": Row("`fpm evaluate --model` a pretraining run", 2,
                                      "a pretraining run, whose classification head is untrained",
                                      _evaluate_pretraining_run, _no_files_written("eval")),
    "export a missing tag": Row("`fpm export --tag` a tag that does not exist", 2,
                                "step-00000999: no such checkpoint (complete ones: step-00000004, step-00000006)",
                                _export_missing_tag, _no_files_written("hf")),
    "empty tokenizer input": Row("an empty file to `fpm data train-tokenizer`", 2, "corpus.txt: empty (0 bytes)",
                                 _tokenizer_input(b""), _no_files_written("vocab")),
    "binary tokenizer input": Row("a binary file to `fpm data train-tokenizer`", 2,
                                  "corpus.txt: binary data (a NUL byte at offset 4)",
                                  _tokenizer_input(b"\x7fELF\x00\x01\x02" * 64), _no_files_written("vocab")),
    "empty corpus": Row("an empty corpus to `fpm data prepare`", 2, "corpus.txt: empty (0 bytes)", _empty_corpus,
                        _no_files_written("data")),
}
NEEDS_ROOT = {"full disk (prepare)", "full disk (pretrain)"}  # tmpfs mounts (CI runs as root)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A prepared tiny BERT folder and an uninterrupted 6-step run on it (the reference)."""
    tmp = tmp_path_factory.mktemp("faults")
    _, data, _ = prepared(tmp, "bert", 600)
    run = tmp / "reference"
    run_main(*PRETRAIN, "--data", str(data), "--out", str(run), *SHORT, check=True)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    return {"data": data, "run": run, "ckpt_bytes": size}


def assert_clean(proc: subprocess.CompletedProcess, code: int, says: str) -> None:
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both[-3000:]
    assert proc.returncode == code, (proc.returncode, both[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert says in errors[0], (says, errors[0])


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(ROWS))
def test_fault(name, ctx, tmp_path):
    if name in NEEDS_ROOT and os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    row = ROWS[name]
    local = {**ctx, "unmount": [], "kill": []}
    try:
        argv = row.make(tmp_path, local)
        proc = run_fpm(*argv, timeout=600)
        says = row.says if "holder" not in local else local["holder"]
        assert_clean(proc, row.code, row.says)
        assert says in proc.stderr
        if row.check is not None:
            row.check(tmp_path, local)
    finally:
        for p in local["kill"]:
            p.kill()
            p.wait()
        for m in reversed(local["unmount"]):
            subprocess.run(["umount", "-l", str(m)])


@pytest.mark.parametrize("argv, says", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_error_is_one_line_and_the_usage(argv, says):
    proc = run_main(*argv)
    assert_clean(proc, 2, says)
    usage = [line for line in proc.stderr.splitlines() if line.startswith("usage: fpm")]
    assert len(usage) == 1 and "--help" in usage[0], proc.stderr


@pytest.mark.cli
def test_bare_fpm_prints_the_help_and_exits_2_and_a_usage_error_too():
    """The real entry point, in a fresh process (the usage errors above run its main() in this one)."""
    usage = run_fpm("pretrain", "bert-e-l", "--max-step", "5", timeout=120)
    assert_clean(usage, 2, "No such option: --max-step")
    proc = run_fpm(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "pretrain" in proc.stdout and "finetune" in proc.stdout


@pytest.mark.e2e
def test_verify_passes_an_intact_folder(ctx):
    proc = run_fpm("data", "verify", str(ctx["data"]), timeout=120)
    assert proc.returncode == 0 and "intact" in proc.stdout, proc.stderr


@pytest.mark.e2e
def test_the_quiet_things(ctx, tmp_path):
    """A resumed run counts its progress from the resume step to max_steps; no library build
    chatter; exported files get the mode the umask gives."""
    run = tmp_path / "run"
    shutil.copytree(ctx["run"], run)
    proc = run_fpm(*PRETRAIN, "--data", str(ctx["data"]), "--out", str(run), "--max-steps", "8", "--save-every",
                   "2", "--set", "train.log_every=1", check=True)
    assert "resumed from" in proc.stdout and "step 8/8" in proc.stdout and "/2 " not in proc.stdout, proc.stdout
    assert "built successfully" not in proc.stdout + proc.stderr
    out = tmp_path / "hf"
    run_fpm("export", str(run), "--out", str(out), check=True)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_the_readme_lists_every_row():
    readme = (ROOT / "README.md").read_text()
    missing = [row.fault for row in ROWS.values() if row.fault not in readme]
    assert not missing, missing
