"""`fpm pretrain` end to end on CPU: learning, exact resume (SIGKILL and SIGTERM), ZeRO stages,
bf16, two processes, damaged checkpoints, non-finite losses, fp16 refusal, HF export."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fpm.engine.checkpoint import complete_tags
from fpm.engine.metrics import read_metrics
from fpm.engine.signals import EXIT_NONFINITE, EXIT_PREEMPTED

from conftest import run_main
from fixtures import prepared

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bert_data(tmp_path_factory):
    _, data, _ = prepared(tmp_path_factory.mktemp("bert-data"), "bert", 2000)
    return data


def pretrain(out: Path, *args: str, recipe: str = "bert-e-l", data: Path | None = None, check=True, env=None):
    """`fpm pretrain` in this process (:func:`run_main`); the runs killed mid-way are processes (:func:`start`)."""
    extra = ["--data", str(data)] if data else []
    return run_main("pretrain", recipe, "--preset", "tiny", "--out", str(out), *extra, *args, check=check, env=env)


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def start(out: Path, *args: str, data: Path, new_group: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fpm", "pretrain", "bert-e-l", "--preset", "tiny", "--out",
                             str(out), "--data", str(data), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy(), start_new_session=new_group)


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        latest = out / "checkpoints" / "latest"
        if latest.is_file() and int(latest.read_text().strip().split("-")[1]) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


GOLDEN = Path(__file__).parent / "golden_losses.json"
GOLDEN_ARGS = ["--max-steps", "200", "--save-every", "200", "--set", "train.log_every=1"]


def machine(threads: int) -> str:
    """What decides the last bits of a CPU run: the CPU, its vector extensions, threads, torch."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return (f"{model} | {torch.backends.cpu.get_cpu_capability()} | amx={'amx_bf16' in flags} | "
            f"threads={threads} | torch {torch.__version__}")


@pytest.mark.parametrize("recipe", ["bert-e-l", "cpm-x-s", "cpm-2-x-s"])
def test_tiny_loss_falls_within_200_steps_and_starts_on_the_golden_losses(tmp_path, recipe):
    """The first 20 losses of each family (tiny, fp32, seed 1234, dropout as the preset says) were
    recorded before the package was reorganised (issue 18): on the machine kind that recorded them
    they must come out bit for bit; elsewhere (another CPU's kernels round differently) within 1e-4."""
    out = tmp_path / "run"
    golden = json.loads(GOLDEN.read_text())
    recorded = int(golden["machine"].split("threads=")[1].split(" ")[0])
    # on the recording's machine kind, as many threads as the recording (the bits depend on them);
    # elsewhere the comparison is to 1e-4 and the run takes the test worker's share of the cores
    same_kind = golden["machine"] == machine(recorded)
    pretrain(out, *GOLDEN_ARGS, recipe=recipe, env={"FPM_THREADS": str(recorded)} if same_kind else None)
    l = losses(out)
    first20 = [l[s] for s in range(1, 21)]
    want = golden["losses"][recipe]
    run = json.loads((out / "run.json").read_text())
    if golden["machine"] == machine(run["threads"]):
        assert first20 == want, (recipe, first20, want)
    else:
        assert np.allclose(first20, want, rtol=1e-4, atol=0), (recipe, golden["machine"], machine(run["threads"]))
    first = np.mean([l[s] for s in range(1, 21)])
    last = np.mean([l[s] for s in range(181, 201)])
    assert last < first - 1.0, (recipe, first, last)  # at least one nat better
    assert run["exit_code"] == 0 and run["step"] == 200
    assert run["train_precision"] == {"requested": "fp32", "precision": "fp32", "tf32": False,
                                      "reason": "given: fp32", "warning": None}
    m = [row for row in read_metrics(out) if "loss" in row][-1]  # the last training row (validation follows)
    assert {"step", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "mfu", "elapsed_s"} <= set(m)
    assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1 and m["grad_norm"] > 0
    assert (out / "tb").is_dir() and list((out / "tb").iterdir())
    assert (out / "recipe.yaml").is_file() and (out / "ds_config.json").is_file()


def _resume_check(full: Path, resumed: Path, resume_step: int, max_steps: int) -> None:
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(1, max_steps + 1))
    after = [s for s in range(resume_step + 1, max_steps + 1)]
    assert [a[s] for s in after] == [b[s] for s in after]  # bit-identical losses after the resume point
    wa, wb = final_weights(full), final_weights(resumed)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# fp32 through the CLI: tests/test_reproducible.py (SIGKILL, resume, bit for bit); here bf16 without
# ZeRO, i.e. fpm's flat master weights
@pytest.mark.parametrize("precision", ["bf16"])
def test_exact_resume_after_sigkill(tmp_path, bert_data, precision):
    args = ["--max-steps", "36", "--save-every", "12", "--set", "train.log_every=1",
            "--set", f"train.precision={precision}", "--set", "train.async_save=true"]  # written in the background
    full = tmp_path / "full"
    pretrain(full, *args, data=bert_data)
    killed = tmp_path / "killed"
    proc = start(killed, *args, data=bert_data)
    wait_for_checkpoint(killed, proc, 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = max(losses(killed))
    assert done_before < 36
    proc = pretrain(killed, *args, data=bert_data)
    assert "resumed from" in proc.stdout
    resume_step = int(proc.stdout.split("(step ")[1].split(")")[0])
    assert resume_step in (12, 24)
    _resume_check(full, killed, resume_step, 36)


SIGNAL_ARGS = ["--max-steps", "30", "--save-every", "100", "--set", "train.log_every=1", "--set", "train.async_save=true"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, bert_data):
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    pretrain(full, *SIGNAL_ARGS, data=bert_data)
    return full


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_to_the_process_group_saves_and_exits_75(tmp_path, bert_data, sig):
    """SIGTERM to the whole process group is what SLURM (scancel, preemption, time limit) and
    `timeout` send, SIGINT what Ctrl-C sends: the DataLoader workers get it too."""
    run = tmp_path / "run"
    proc = start(run, *SIGNAL_ARGS, data=bert_data, new_group=True)
    t0 = time.time()
    while not losses(run) or max(losses(run)) < 5:
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "Traceback" not in out + err
    tags = complete_tags(run / "checkpoints")
    assert len(tags) == 1  # saved on its own: save_every (100) was never reached
    stopped = int(tags[0].split("-")[1])
    assert 5 <= stopped < 30 and "pre-empted" in out
    # the resume of such a checkpoint, bit for bit: the next test (the same signal, a save in flight)


def test_a_background_save_in_flight_at_preemption_is_finished_sealed_and_resumed_exactly(tmp_path, bert_data,
                                                                                         uninterrupted):
    """Saving every step in the background, a save is always in flight when the signal is agreed on:
    fpm finishes and seals that one (SLURM's window holds one save) and the rerun resumes it exactly."""
    run = tmp_path / "run"
    args = [*SIGNAL_ARGS, "--save-every", "1"]  # the last --save-every wins
    proc = start(run, *args, data=bert_data, new_group=True)
    t0 = time.time()
    while not losses(run) or max(losses(run)) < 8:
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    stopped = int(complete_tags(run / "checkpoints")[-1].split("-")[1])
    assert f"pre-empted: checkpoint saved at step {stopped}" in out
    assert max(losses(run)) == stopped + 1  # the step after it was trained; its save was not started
    assert not (run / "checkpoints" / f"step-{stopped + 1:08d}").exists()
    pretrain(run, *args, data=bert_data)
    _resume_check(uninterrupted, run, stopped, 30)


# every stage and accumulation is proved equal to a one-process reference in test_equivalence.py;
# here: ZeRO-3's export, bf16's two optimizer paths (ZeRO-1's BF16_Optimizer, ZeRO-0's flat master
# weights), ZeRO-2's gradient norm, each through the command line
@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (3, "fp32"), (1, "bf16"), (0, "bf16")])
def test_zero_stages_and_bf16_train(tmp_path, bert_data, stage, precision):
    out = tmp_path / "run"
    background = "true" if stage in (1, 3) else "false"  # ZeRO-1 and 3 checkpoints written by the background writer
    pretrain(out, "--max-steps", "60", "--save-every", "60", "--set", f"deepspeed.zero_stage={stage}",
             "--set", f"train.precision={precision}", "--set", f"train.async_save={background}", data=bert_data)
    l = losses(out)
    assert l[60] < l[10] - 0.5
    assert [m for m in read_metrics(out) if "loss" in m][-1]["grad_norm"] > 0  # every optimizer path reports its gradient norm
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    # bf16 without ZeRO on CPU: bf16 weights with fpm's flat fp32 master weights, DeepSpeed's wrapper off
    flat = precision == "bf16" and stage == 0
    assert ds["bf16"]["enabled"] == (precision == "bf16" and not flat)
    assert ("fpm_master_weights" in ds) == flat and (ds["gradient_clipping"] == 0) == flat
    if precision == "bf16":
        state = torch.load(out / "checkpoints" / "step-00000060" / "mp_rank_00_model_states.pt", weights_only=False)
        assert {v.dtype for v in state["module"].values() if v.is_floating_point()} == {torch.bfloat16}
    ckpt = out / "checkpoints" / "step-00000060"
    if stage:
        assert list(ckpt.glob("*zero_pp_rank_0_*optim_states.pt"))
    if stage == 3:  # the exported model equals the sharded one (consolidation works), with its tokenizer
        export_and_compare(out, tmp_path / "hf", "MegatronBertForPreTraining")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
        enc = tok("Anna walked to the market.", "Then she left.")
        assert enc["input_ids"][0] == tok.cls_token_id and enc["token_type_ids"][-1] == 1


@pytest.mark.system
@pytest.mark.parametrize("setting", ["deepspeed.zero_stage=2", "train.precision=bf16"])  # bf16: ZeRO-0 master weights
def test_two_processes_with_torchrun(tmp_path, bert_data, setting):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fpm", "pretrain", "bert-e-l", "--preset", "tiny", "--out", str(out), "--data",
                           str(bert_data), "--max-steps", "40", "--save-every", "20", "--set",
                           setting], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "16 = 8 x 1 x 2" in proc.stdout
    ckpt = out / "checkpoints" / "step-00000040"
    assert (ckpt / "rng" / "rank00000.pt").is_file() and (ckpt / "rng" / "rank00001.pt").is_file()
    l = losses(out)
    assert l[40] < l[10]
    if "zero_stage" not in setting:
        # no ZeRO: one replica's optimizer state (fpm's master weights), kept by rank 0
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)
        assert "master_weights" in state["optimizer"]
        return
    assert len(list(ckpt.glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    # a ZeRO checkpoint of 2 ranks resumes on 1 through DeepSpeed's universal format (issue 19; the
    # losses against an uninterrupted run on the new shape: tests/test_reshard.py)
    proc = pretrain(out, "--max-steps", "44", "--save-every", "44", "--set", "deepspeed.zero_stage=2",
                    data=bert_data, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "universal format" in proc.stdout and "resumed from" in proc.stdout and "Traceback" not in proc.stderr
    assert losses(out)[44] < l[10]


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, bert_data):
    out = tmp_path / "run"
    pretrain(out, "--max-steps", "20", "--save-every", "10", data=bert_data)
    assert complete_tags(out / "checkpoints") == ["step-00000010", "step-00000020"]
    victim = out / "checkpoints" / "step-00000020" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    victim.write_bytes(bytes(data))
    proc = pretrain(out, "--max-steps", "25", "--save-every", "10", data=bert_data)
    assert "step-00000020 is damaged" in proc.stderr and "does not match its checksum" in proc.stderr
    assert "resumed from" in proc.stdout and "(step 10)" in proc.stdout
    assert max(losses(out)) == 25


# a latest pointing to an unsealed save, a damaged file: tests/test_checkpoint.py (fast)


def test_nonfinite_loss_stops_with_exit_4_and_keeps_the_last_checkpoint(tmp_path, bert_data):
    out = tmp_path / "run"
    proc = pretrain(out, "--max-steps", "200", "--save-every", "1", "--set", "train.lr=1e12", "--set",
                    "train.warmup_steps=0", "--set", "train.grad_clip=0", "--set", "train.max_nonfinite_steps=3",
                    "--set", "train.log_every=1", data=bert_data, check=False)
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-2000:]
    assert "not finite for" in proc.stderr and "last good checkpoint" in proc.stderr
    tags = complete_tags(out / "checkpoints")
    assert tags and int(tags[-1].split("-")[1]) < 200


def test_fp16_is_refused_on_cpu_with_advice_where_deepspeed_refuses_it(tmp_path, bert_data):
    """DeepSpeed accepts fp16 on a CPU whose oneDNN computes it (AVX-512 FP16, e.g. Sapphire Rapids)
    and refuses it elsewhere: fpm refuses it in one line where DeepSpeed would, and trains otherwise."""
    probe = subprocess.run([sys.executable, "-c", "from deepspeed.accelerator import get_accelerator; "
                            "print(get_accelerator().is_fp16_supported())"], capture_output=True, text=True,
                           env={**os.environ, "DS_ACCELERATOR": "cpu"}, check=True)
    proc = pretrain(tmp_path / "run", "--max-steps", "5", "--set", "train.precision=fp16", data=bert_data,
                    check=False)
    if probe.stdout.strip().splitlines()[-1] == "True":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())
    else:
        assert proc.returncode == 2 and "fp16 training needs a GPU" in proc.stderr and "bf16" in proc.stderr


def test_changed_recipe_on_the_same_out_is_refused(tmp_path, bert_data):
    out = tmp_path / "run"
    pretrain(out, "--max-steps", "5", "--save-every", "5", data=bert_data)
    proc = pretrain(out, "--max-steps", "10", "--set", "model.n_layers=3", data=bert_data, check=False)
    assert proc.returncode == 2 and "holds a run of a different recipe" in proc.stderr
    assert "model.n_layers: 7 -> 3" in proc.stderr


EXPORT_CHECK = r"""
import sys, json, numpy as np, torch
import transformers
assert "fpm" not in sys.modules
cls = getattr(transformers, sys.argv[2])
model = cls.from_pretrained(sys.argv[1]).eval()
inputs = {k: torch.tensor(v) for k, v in json.loads(sys.argv[3]).items()}
with torch.no_grad():
    out = model(**inputs)
logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
np.save(sys.argv[4], logits.numpy())
assert "fpm" not in sys.modules
"""


def export_and_compare(run: Path, hf: Path, cls: str) -> None:
    from fpm.runs import load_run_model

    run_main("export", str(run), "--out", str(hf), check=True)
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    recipe, model, tok, _ = load_run_model(run)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, recipe.tokenizer.vocab_size, (2, 24), generator=g)
    inputs = {"input_ids": ids.tolist()}
    if recipe.model.family == "t5":
        inputs["decoder_input_ids"] = ids[:, :7].tolist()
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in inputs.items()})
    ours = (out.prediction_logits if hasattr(out, "prediction_logits") else out.logits).numpy()
    script = hf.parent / "check.py"
    script.write_text(EXPORT_CHECK)
    res = subprocess.run([sys.executable, str(script), str(hf), cls, json.dumps(inputs), str(hf.parent / "l.npy")],
                         capture_output=True, text=True, cwd=hf.parent, env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    theirs = np.load(hf.parent / "l.npy")
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 1e-5


@pytest.mark.parametrize("recipe, cls", [("cpm-x-s", "GPT2LMHeadModel"), ("cpm-2-x-s", "T5ForConditionalGeneration")])
def test_export_gpt_and_t5_match_plain_transformers(tmp_path, recipe, cls):
    out = tmp_path / "run"
    pretrain(out, "--max-steps", "10", "--save-every", "10", "--set", "deepspeed.zero_stage=2", recipe=recipe)
    export_and_compare(out, tmp_path / "hf", cls)
    generate_like_transformers(out, tmp_path / "hf", recipe)


def generate_like_transformers(run: Path, exported: Path, recipe: str) -> None:
    """`fpm generate` on the run directory writes what transformers' generate writes with the
    exported folder and the same settings (greedy, and sampled with a seed)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from fpm.data.tokenizers import load_tokenizer_path
    from fpm.commands.generate import encode_prompt, infill

    tok = load_tokenizer_path(json.loads((exported / "fpm_tokenizer" / "fpm_tokenizer.json").read_text())["kind"],
                              exported / "fpm_tokenizer")
    family = "t5" if recipe.startswith("cpm-2") else "gpt"
    model = (AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM).from_pretrained(exported).eval()
    prompt = "小明<s_0>市场。" if family == "t5" else "小明去了"
    stop = tok.specials.eos if family == "t5" else tok.specials.eod
    for flags, kwargs in (([], {"do_sample": False}),
                          (["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"],
                           {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9})):
        proc = run_main("generate", str(run), "--prompt", prompt, "--max-new-tokens", "12", *flags, check=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        ids = torch.tensor([encode_prompt(tok, family, prompt)])
        torch.manual_seed(3 if kwargs["do_sample"] else 0)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 eos_token_id=stop, pad_token_id=tok.specials.pad, **kwargs)[0].tolist()
        new = out[ids.shape[1]:] if family == "gpt" else out[1:]
        new = new[:new.index(stop)] if stop in new else new
        assert got["tokens"] == len(new) > 0
        if family == "gpt":
            assert got["text"] == tok.decode(new)
        else:  # the spans after each sentinel, filled into the prompt
            assert (got["text"], got["spans"]) == infill(tok, prompt, new) and got["text"].startswith("小明")


# BERT's export (ZeRO-3, with its tokenizer): test_zero_stages_and_bf16_train[3-fp32]


if __name__ == "__main__":  # python tests/test_pretrain.py: record the golden losses on this machine
    import tempfile

    record = {"machine": machine(torch.get_num_threads()), "args": GOLDEN_ARGS, "losses": {}}
    for name in ("bert-e-l", "cpm-x-s", "cpm-2-x-s"):
        with tempfile.TemporaryDirectory() as tmp:
            pretrain(Path(tmp) / "run", *GOLDEN_ARGS, recipe=name)
            record["losses"][name] = [losses(Path(tmp) / "run")[s] for s in range(1, 21)]
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


def test_precision_auto_is_chosen_by_this_machine_said_recorded_and_kept_on_resume(tmp_path):
    from fpm.engine.precision import choose, detect

    want = choose("auto", detect())
    out = tmp_path / "run"
    proc = pretrain(out, "--max-steps", "2", "--save-every", "2", "--set", "train.precision=auto", recipe="cpm-x-s")
    assert f"precision {want.precision}: auto: " in proc.stdout + proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["train_precision"]["requested"] == "auto" and run["train_precision"]["precision"] == want.precision
    assert f"precision: {want.precision}" in (out / "recipe.yaml").read_text()  # the run directory says what ran
    # resumed with auto again: the precision the run started with, whatever this machine would pick
    again = pretrain(out, "--max-steps", "4", "--save-every", "2", "--set", "train.precision=auto", recipe="cpm-x-s")
    assert "auto: the precision this run started with" in again.stdout + again.stderr
