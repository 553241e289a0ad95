"""Downstream evaluation during pretraining (fpm.eval.downstream): chosen checkpoints fine-tuned and
scored beside the training, never changing or stopping it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fpm.config import dump_recipe, load_recipe
from fpm.errors import FpmError
from fpm.eval import downstream
from fpm.rundir import RunDir, write_json

from conftest import run_main
from fixtures import prepared

ON = ["downstream.task=qqp", "downstream.every=10", "downstream.max_steps=12"]
ARGS = ["--max-steps", "20", "--save-every", "10", "--set", "train.log_every=1", "--set", "train.eval_every=0"]


def recipe(name: str = "bert-e-l", *sets: str):
    return load_recipe(name, preset="tiny", overrides=list(sets))


# ------------------------------------------------------------------ logic


@pytest.mark.parametrize("name, sets, error", [
    ("cpm-x-s", ["downstream.task=tnews"], "fine-tunes a BERT encoder; this is a gpt recipe"),
    ("bert-e-l", ["downstream.task=harness", "downstream.harness_tasks=[arc_easy]"], "scores GPT and T5 runs"),
    ("epm-x-s", ["downstream.task=harness"], "needs downstream.harness_tasks"),
    ("bert-c", ["downstream.task=qqp"], "downstream.task=qqp is a en task; this recipe's language is zh"),
    ("bert-e-l", ["downstream.task=qqp", "downstream.every=150"], "downstream.every=150 is not a multiple of "
                                                                  "train.save_every=100"),
    ("bert-e-l", ["downstream.task=qqp", "downstream.preset=null"], "downstream.data_dir is not set"),
    ("bert-e-l", ["downstream.task=qqp", "downstream.data_dir=/nonexistent"], "/nonexistent: no such folder"),
    ("bert-e-l", ["downstream.task=qqp", "downstream.overrides=[\"train.lr_x=1\"]"], "lr_x"),
])
def test_a_downstream_section_that_cannot_run_is_refused_before_training(name, sets, error):
    with pytest.raises(FpmError, match=error.replace("(", r"\(").replace(")", r"\)")):
        downstream.check(recipe(name, *sets))
    downstream.check(recipe(name))  # off: nothing to check


def test_chosen_checkpoints_are_the_multiples_of_every_the_steps_named_and_the_last():
    def steps(*sets):
        cfg = recipe("bert-e-l", "downstream.task=qqp", *sets).downstream
        return [s for s in range(100, 1001, 100) if downstream.chosen(s, cfg, 1000)]
    assert steps("downstream.every=300") == [300, 600, 900, 1000]
    assert steps() == [1000]
    assert steps("downstream.steps=[200, 500]", "downstream.last=false") == [200, 500]
    with pytest.raises(FpmError, match=r"downstream.steps: \[150\] are not checkpoints of this run"):
        downstream.check(recipe("bert-e-l", "downstream.task=qqp", "downstream.steps=[150, 200]"))


def test_the_snapshot_is_hard_links_that_outlive_the_pruned_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    ckpt = run.checkpoints / "step-00000010"
    (ckpt / "global_step10").mkdir(parents=True)
    (ckpt / "global_step10" / "model.pt").write_bytes(b"w" * 1000)
    run.recipe.write_text(dump_recipe(recipe()))
    run.tokenizer.mkdir()
    (run.tokenizer / "vocab.txt").write_text("a\n")
    here = downstream.snapshot(run.path, 10, ckpt)
    linked = here / "init" / "checkpoints" / "step-00000010" / "global_step10" / "model.pt"
    assert linked.stat().st_ino == (ckpt / "global_step10" / "model.pt").stat().st_ino  # no copy
    assert RunDir(here / "init").is_pretraining_run() and (here / "init" / "tokenizer" / "vocab.txt").is_file()
    import shutil

    shutil.rmtree(ckpt)  # keep_last pruned it
    assert linked.read_bytes() == b"w" * 1000


def test_the_job_runs_without_the_launchers_rank_variables(monkeypatch):
    for k, v in (("RANK", "3"), ("WORLD_SIZE", "8"), ("MASTER_PORT", "2"), ("SLURM_PROCID", "3"), ("HOME_X", "y")):
        monkeypatch.setenv(k, v)
    env = downstream.job_env()
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID"} & set(env)
    assert env["HOME_X"] == "y" and env["FPM_THREADS"] == "1"


def test_a_failure_is_said_once_by_the_pretraining_and_summarised(tmp_path, capsys):
    run = tmp_path / "run"
    downstream.folder(run, 10).mkdir(parents=True)
    downstream.folder(run, 20).mkdir(parents=True)
    downstream.folder(run, 30).mkdir(parents=True)
    write_json(downstream.folder(run, 10) / "result.json",
               {"step": 10, "split": "downstream", "metric": "accuracy", "value": 0.75})
    write_json(downstream.folder(run, 20) / "result.json",
               {"step": 20, "split": "downstream", "error": "fpm finetune exited 2: boom"})
    watch = downstream.Watch(run, rank=0)
    watch(1)
    watch(2)
    err = capsys.readouterr().err
    assert err.count("downstream evaluation of step 20 failed") == 1 and "boom" in err
    downstream.Watch(run, rank=1)(1)
    assert "failed" not in capsys.readouterr().err  # rank 0 only
    assert downstream.summary(run) == {"scores": {"10": 0.75}, "metric": "accuracy",
                                       "failed": {"20": "fpm finetune exited 2: boom"}, "pending": [30]}


# ------------------------------------------------------------------ end to end


def wait_for_results(run: Path, steps: list[int], timeout: float = 400) -> list[dict]:
    t0 = time.time()
    files = [downstream.folder(run, s) / "result.json" for s in steps]
    while not all(f.is_file() for f in files):
        assert time.time() - t0 < timeout, f"downstream results missing after {timeout} s: {files}"
        time.sleep(0.5)
    return [json.loads(f.read_text()) for f in files]


def training_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines() if line.strip()]
    timing = {"tokens_per_s", "mfu", "elapsed_s"}
    return [{k: v for k, v in r.items() if k not in timing} for r in rows if r.get("split") != "downstream"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A prepared tiny BERT folder and a 20-step run on it without downstream evaluation."""
    tmp = tmp_path_factory.mktemp("downstream")
    _, data, _ = prepared(tmp, "bert", 1000)
    run_main("pretrain", "bert-e-l", "--preset", "tiny", "--data", str(data), "--out", str(tmp / "ref"), *ARGS,
             check=True)
    return tmp, data, tmp / "ref"


@pytest.mark.e2e
def test_chosen_checkpoints_are_scored_beside_training_which_stays_bit_identical(reference, tmp_path):
    tmp, data, ref = reference
    run = tmp_path / "run"
    sets = [a for s in [*ON, "train.keep_last=1"] for a in ("--set", s)]
    run_main("pretrain", "bert-e-l", "--preset", "tiny", "--data", str(data), "--out", str(run), *ARGS, *sets,
             check=True)
    at10, at20 = wait_for_results(run, [10, 20])
    assert training_rows(run) == training_rows(ref)  # the pretraining is the same run
    rows = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    scored = sorted((r["step"], r["value"]) for r in rows if r.get("split") == "downstream")
    assert scored == [(10, at10["value"]), (20, at20["value"])] and at10["metric"] == "accuracy"
    assert RunDir(run).status()["downstream"]["scores"] == {"10": at10["value"], "20": at20["value"]}
    assert not (RunDir(run).checkpoints / "step-00000010").exists()  # pruned (keep_last=1), scored all the same
    assert not (downstream.folder(run, 10) / "init").exists()  # the snapshot is gone once scored
    # the score is `fpm finetune` of that checkpoint: the same fine-tuning losses and dev scores
    direct = tmp_path / "direct"
    run_main("finetune", "qqp", "--init", str(RunDir(ref).checkpoints / "step-00000010"), "--preset", "tiny",
             "--max-steps", "12", "--no-floors", "--out", str(direct), env={"FPM_THREADS": "1"}, check=True)
    job = downstream.folder(run, 10) / "finetune"
    assert training_rows(job) == training_rows(direct)
    mine = json.loads(RunDir(direct).results.read_text())
    assert (at10["dev_accuracy"], at10["dev_f1"]) == (mine["accuracy"], mine["f1"])
    assert training_rows(downstream.folder(run, 20) / "finetune") != training_rows(job)  # another checkpoint
    run_main("report", str(run), check=True)  # the run's page plots and lists them
    md, seq = (run / "report.md").read_text(), recipe().data.seq_len
    for at in (at10, at20):
        assert f"| {at['step']} | {at['step'] * 16 * seq:,} | qqp | accuracy | {100 * at['value']:.2f} |" in md
    assert (run / "plots" / "downstream.png").is_file()


@pytest.mark.e2e
def test_a_crashing_downstream_job_leaves_the_pretraining_running_and_says_so(reference, tmp_path):
    tmp, data, ref = reference
    empty = tmp_path / "no-task"
    empty.mkdir()  # a folder without the task's files: fpm finetune exits 2
    run = tmp_path / "run"
    sets = [a for s in [*ON, f"downstream.data_dir={empty}", "downstream.preset=null", "downstream.every=0",
                        "downstream.steps=[10]", "downstream.last=false"]
            for a in ("--set", s)]
    proc = run_main("pretrain", "bert-e-l", "--preset", "tiny", "--data", str(data), "--out", str(run), *ARGS, *sets)
    assert proc.returncode == 0, proc.stderr
    (at10,) = wait_for_results(run, [10])
    assert at10["error"] == f"fpm finetune exited 2: error: {empty / 'train.tsv'}: not found (qqp expects train.tsv, " \
                           "dev.tsv, test.tsv)"
    assert "train.tsv: not found" in Path(at10["log"]).read_text()
    assert training_rows(run) == training_rows(ref)
    failed = RunDir(run).status()["downstream"]["failed"]
    assert set(failed) == {"10"} and not downstream.folder(run, 20).exists()  # steps [10] only
    rows = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    assert sum(1 for r in rows if r.get("split") == "downstream" and "error" in r) == 1


# ------------------------------------------------------------------ fpm report RUN_DIR


def test_a_runs_report_shows_its_losses_scores_spikes_and_restarts(tmp_path):
    """The report of a run whose metrics are written here by hand: every downstream row, failure,
    rollback and restart appears, at the tokens its step had trained on."""
    from fpm.engine.metrics import MetricsLogger

    run = tmp_path / "run"
    r = recipe()
    RunDir(run).path.mkdir()
    RunDir(run).recipe.write_text(dump_recipe(r))
    RunDir(run).write_status(status="done", world_size=2, device="cpu (test)", wall_s=7200.0)
    log = MetricsLogger(run, enabled=True, tensorboard=False)
    for step in range(1, 31):
        log.log({"step": step, "loss": 8.0 - step / 10, "samples": (step + (5 if step > 20 else 0)) * 16,
                 "tokens_per_s": 1000.0 + step, "mfu": 0.25, "elapsed_s": 60.0 * step,
                 "spikes_skipped": 0 if step < 18 else 2})
        if step % 10 == 0:
            log.log({"step": step, "split": "validation", "val_loss": 7.5 - step / 100})
    log.log({"step": 15, "event": "rollback", "from_step": 18, "skipped_data_steps": [15, 17], "spikes_skipped": 2,
             "rollbacks": 1})
    log.log({"step": 20, "event": "resumed", "world_size": 2, "time": 0.0})
    log.log({"step": 10, "split": "downstream", "task": "qqp", "metric": "accuracy", "value": 0.625,
             "dev_accuracy": 0.625, "dev_f1": 0.5})
    log.log({"step": 30, "split": "downstream", "error": "fpm finetune exited 2: boom", "log": "x.log"})
    log.close()
    paths = run_main("report", str(run), check=True)
    md = (run / "report.md").read_text()
    seq = r.data.seq_len
    assert f"| 10 | {10 * 16 * seq:,} | qqp | accuracy | 62.50 | 62.50 | 50.00 | |" in md
    assert f"| 30 | {35 * 16 * seq:,} | | | | | | failed: fpm finetune exited 2: boom |" in md  # its samples
    assert "2 update(s) skipped for loss spikes, 1 rollback(s), 0 step(s) skipped on fp16 overflow, 1 restart(s)" in md
    assert "| 15 | rollback | from step 18, data steps 16-18 skipped |" in md and "| 20 | resumed | on 2 process(es) |" in md
    assert "best validation loss 7.2000 at step 30" in md and "Median 1,016 tokens/s, median MFU 25.0%" in md
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,iVBOR") == 3  # loss, downstream, throughput: embedded
    assert paths.returncode == 0
