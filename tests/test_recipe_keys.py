"""Every recipe key reaches the code that uses it, or says why it need not: none is accepted and
ignored.

For every key of the three recipe kinds, ``KEYS`` names a *reader* — the function the commands call
with the recipe to build what the key decides: the engine's spec and DeepSpeed configuration, the
model, a prepared folder and its vocabulary, the pretraining samples, the fine-tuning split, the
classifier, the floors, the plan — and a *poisoned* value. The test loads the recipe through the
real loader twice, as given and with ``--set KEY=POISON``, runs the reader on both and asserts that
what it built differs: the value reached its reader. A key added to the schema without an entry
fails; a reader that stops passing a key on (``test_a_key_cut_from_its_reader_is_caught``) fails.
Informational keys (the paper's figures, descriptions) say why they change nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from fpm.config import load_recipe
from fpm.config.schema import FinetuneRecipe, Recipe, SweepRecipe
from fpm.errors import FpmError

from conftest import run_main

INFO = "informational"


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = [t for t in (field.annotation, *typing.get_args(field.annotation))
               if isinstance(t, type) and issubclass(t, BaseModel)]
        out += keys(sub[0], f"{prefix}{name}.") if sub else [prefix + name]
    return out


def built(fn):
    """What a reader built, or the one-line error it stopped with (also an effect of the value)."""
    try:
        return fn()
    except FpmError as exc:
        return ("error", str(exc))


# ------------------------------------------------------------------ readers (recipe name, --set list) -> built


def spec(name: str, sets: list[str], kind: str = "pretrain"):
    """The engine's spec and the DeepSpeed configuration derived from it (fpm.engine)."""
    from fpm.engine.setup import spec_ds_config
    from fpm.engine.spec import finetuning_spec, pretraining_spec

    def build():
        r = load_recipe(name, preset="tiny", overrides=sets, kind=kind)
        s = pretraining_spec(r, 1, 1.0) if kind == "pretrain" else finetuning_spec(r, 1, 1000)
        return dataclasses.asdict(s), spec_ds_config(s)
    return built(build)


def model(name: str, sets: list[str]):
    """The model fpm builds (its configuration, parameter shapes and initial weights)."""
    from fpm.models import build_model

    def build():
        r = load_recipe(name, preset="tiny", overrides=sets)
        m = build_model(r.model, r.tokenizer.vocab_size, seed=1)
        config = {k: v for k, v in m.config.to_dict().items() if k not in ("transformers_version",)}
        config["attention implementation"] = m.config._attn_implementation
        return config, {k: (tuple(v.shape), float(v.double().sum())) for k, v in m.state_dict().items()}
    return built(build)


def samples(name: str, sets: list[str], data: Path):
    """The first pretraining samples the recipe's dataset draws from a prepared folder."""
    from fpm.data.datasets import build_dataset

    def build():
        ds = build_dataset(load_recipe(name, preset="tiny", overrides=sets), data)
        return [{k: v.tolist() for k, v in ds[i].items()} for i in range(6)]
    return built(build)


def prepared(name: str, sets: list[str], tmp: Path, corpus: Path):
    """A folder `fpm data prepare` writes: its vocabulary and its tokens."""
    from fpm.data.prepare import PrepareOptions, prepare

    def build():
        out = tmp / f"p{len(list(tmp.iterdir()))}"
        m = prepare(load_recipe(name, preset="tiny", overrides=sets),
                    PrepareOptions(inputs=[corpus], out=out, workers=0, quiet=True))
        return m["tokenizer"], m["n_tokens"], m["language"], hashlib.sha1((out / "shard_00000.bin").read_bytes()).hexdigest()
    return built(build)


def pretrain_command(name: str, sets: list[str], tmp: Path, monkeypatch):
    """What `fpm pretrain` hands its run session (the collective timeout), and where it writes."""
    import fpm.commands.pretrain as command

    seen = {}

    def session(out, what, dist, timeout=None):
        seen.update(out=str(out), timeout=timeout)
        raise FpmError("stop here")

    monkeypatch.setattr(command, "run_session", session)
    monkeypatch.chdir(tmp)
    environ = dict(os.environ)  # the launcher's variables it fills in stay in there
    try:
        command.pretrain(name, preset="tiny", overrides=sets)
    except FpmError as exc:
        seen.setdefault("error", str(exc))
    finally:
        os.environ.clear()
        os.environ.update(environ)
    return seen


def downstream_jobs(name: str, sets: list[str], tmp: Path, monkeypatch):
    """What `fpm pretrain` starts as its checkpoints are sealed (fpm.eval.downstream): the processes
    it spawns or the SLURM jobs it submits (captured, not run), and the `fpm finetune` command line
    each job builds from the run's saved recipe."""
    from fpm.config import dump_recipe, load_resolved
    from fpm.eval import downstream
    from fpm.rundir import RunDir

    def build():
        r = load_recipe(name, preset="tiny", overrides=sets)
        downstream.check(r)
        if not downstream.enabled(r):
            return "off"
        run = RunDir(tmp / f"r{len(list(tmp.iterdir()))}")
        ckpt = run.checkpoints / "step-x"
        ckpt.mkdir(parents=True)
        (ckpt / "weights").write_text("w")
        run.recipe.write_text(dump_recipe(r))
        launched = []
        monkeypatch.setattr(downstream.subprocess, "Popen", lambda argv, **kw: launched.append(("process", argv[2:])))
        monkeypatch.setattr(downstream.subprocess, "run", lambda argv, **kw: launched.append(("sbatch", argv[:-1])))
        launcher = downstream.Launcher(run.path, r)
        for step in range(r.train.save_every, r.train.max_steps + 1, r.train.save_every):
            launcher(step, ckpt)
        saved = load_resolved(run.recipe).downstream
        argv = [downstream.job_argv(run.path, step, saved) for step in launcher.started]

        def plain(args):
            return [str(a).replace(str(run.path), "RUN") for a in args]
        return [(how, plain(args)) for how, args in launched], [plain(line) for line in argv]
    return built(build)


def data_sources(name: str, sets: list[str]):
    from fpm.commands.pretrain import data_sources as sources

    return built(lambda: sources(None, load_recipe(name, preset="tiny", overrides=sets)))


def plan_json(name: str, sets: list[str]):
    """`fpm plan RECIPE --json`: the cluster it plans for."""
    set_args = [a for s in sets for a in ("--set", s)]
    proc = run_main("plan", name, "--json", *set_args)
    return proc.returncode, proc.stdout


def sweep_dry_run(name: str, sets: list[str], tmp: Path):
    """`fpm sweep-depth SWEEP --dry-run` of the poisoned sweep recipe (written as a YAML file): its
    cells, commands and scripts, and the plan it writes for the report."""
    from fpm.config import dump_recipe

    path = tmp / f"sweep{len(list(tmp.iterdir()))}.yaml"
    path.write_text(dump_recipe(load_recipe(name, overrides=sets)))
    proc = run_main("sweep-depth", str(path), "--dry-run", "--out", str(tmp / "s"))
    from fpm.study.plan import make_plan  # the plan the report reads (sweep_plan.json: bootstrap, confidence)

    plan = make_plan(str(path), task=None, depths=None, seeds=None, preset=None, out=tmp / "s", data=None,
                     data_dir=None, pretrain_sets=[], task_sets=[])
    return [x.replace(str(path), "SWEEP") for x in (proc.stdout, proc.stderr, json.dumps(dataclasses.asdict(plan),
                                                                                          default=str))]


def task_split(name: str, sets: list[str], data: Path):
    """A task split as the loaders read it (rows, labels, texts, bad rows)."""
    from fpm.data.tasks import load_split

    def build():
        s = load_split(load_recipe(name, overrides=sets, kind="finetune").task, data, "train")
        return [(e.texts, e.label) for e in s.examples], s.bad
    return built(build)


def training_order(name: str, sets: list[str]):
    """The order in which fine-tuning reads its training split."""
    from fpm.data.pairs import training_set

    t = load_recipe(name, overrides=sets, kind="finetune").train
    n, L = 200, 32
    lens = np.random.default_rng(0).integers(3, L + 1, n)
    mask = (np.arange(L)[None, :] < lens[:, None]).astype(np.int64)
    ds = training_set({"input_ids": mask, "token_type_ids": 0 * mask, "attention_mask": mask}, np.arange(n) % 2, t)
    return [ds.index(i) for i in range(n)]


def task_score(name: str, sets: list[str]):
    """The dev metrics of fixed predictions and the value that picks the best checkpoint."""
    from fpm.eval.metrics import task_metrics

    task = load_recipe(name, overrides=sets, kind="finetune").task
    rng = np.random.default_rng(0)
    y = rng.integers(0, task.num_labels, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, task.num_labels, 300))
    return task_metrics(task, y.tolist(), p.tolist())


def classifier(name: str, sets: list[str], init: Path):
    """The classifier fine-tuning builds from --init, and how it encodes a long pair."""
    from fpm.classifier import load_init
    from fpm.data.tasks import Example

    def build():
        i = load_init(init, load_recipe(name, overrides=sets, kind="finetune"))
        enc = i.encoder.encode([Example("0", ("word " * 300, "other " * 300), 0, 2)])
        return i.model.config.to_dict(), {k: v.shape for k, v in enc.items()}
    return built(build)


def floor_scores(name: str, sets: list[str], data: Path, tmp: Path):
    """The TF-IDF floor fitted on a task's train split, scored on dev."""
    from fpm.data.tasks import load_split
    from fpm.eval.floors import floors

    task = load_recipe(name, overrides=sets, kind="finetune").task
    splits = {s: load_split(task, data, s, required=s != "test") for s in ("train", "dev", "test")}
    return floors(task, splits, tmp / f"f{len(list(tmp.iterdir()))}")["tfidf"]


def fetch(name: str, sets: list[str]):
    """`fpm data fetch-task`'s request to the Hub (offline here: the error names what it asked for)."""
    from fpm.data.tasks import fetch_task

    return built(lambda: fetch_task(load_recipe(name, overrides=sets, kind="finetune").task, Path("/nonexistent")))


def loaded(name: str, sets: list[str], kind: str | None = None):
    """The loader itself: the recipe's kind and name."""
    def build():
        r = load_recipe(name, preset="tiny", overrides=sets, kind=kind)
        return r.kind, r.name
    return built(build)


def default_out(name: str, sets: list[str]):
    from fpm.commands.pretrain import default_out as out

    return str(out(load_recipe(name, preset="tiny", overrides=sets), "tiny"))


# ------------------------------------------------------------------ the keys: reader and poison

BERT, GPT, T5, ZH_BERT, GPT_EN = "bert-e-l", "cpm-x-s", "cpm-2-x-s", "bert-c", "epm-x-s"
DS = {"zero_stage": 2, "offload_optimizer": True, "offload_params": True, "overlap_comm": False,
      "contiguous_gradients": False, "reduce_bucket_size": 12345, "allgather_bucket_size": 23456}
DS_BASE = {"offload_optimizer": ["deepspeed.zero_stage=2"], "offload_params": ["deepspeed.zero_stage=3"],
           "reduce_bucket_size": ["deepspeed.zero_stage=2"], "allgather_bucket_size": ["deepspeed.zero_stage=2"]}


def _deepspeed_keys(reader: str, name: str) -> dict:
    return {f"deepspeed.{k}": (reader, name, v, DS_BASE.get(k, [])) for k, v in DS.items()}


PRETRAIN = {
    "kind": ("loaded", BERT, "finetune", []),
    "name": ("default_out", BERT, "renamed", []),
    "description": (INFO, "shown by `fpm recipes show`; free text"),
    "language": ("prepared", BERT, "zh", []),
    "model.family": ("model", GPT, ("t5", ["model.n_encoder_layers=2", "model.n_decoder_layers=2"]), []),
    "model.n_layers": ("model", GPT, 3, []),
    "model.n_encoder_layers": ("model", T5, 3, []),
    "model.n_decoder_layers": ("model", T5, 3, []),
    "model.d_model": ("model", GPT, 96, []),
    "model.n_heads": ("model", GPT, 2, []),
    "model.d_head": ("model", T5, 8, []),
    "model.d_ff": ("model", GPT, 100, []),
    "model.activation": ("model", GPT, "relu", []),
    "model.max_positions": ("model", GPT, 300, []),
    "model.type_vocab_size": ("model", BERT, 3, []),
    "model.dropout": ("model", GPT, 0.3, []),
    "model.attention_dropout": ("model", GPT, 0.3, []),
    "model.layer_norm_eps": ("model", GPT, 1e-3, []),
    "model.init_std": ("model", GPT, 0.05, []),
    "model.scale_residual_init": ("model", GPT, False, []),
    "model.tie_embeddings": ("model", GPT, False, []),
    "model.relative_attention_num_buckets": ("model", T5, 8, []),
    "model.relative_attention_max_distance": ("model", T5, 64, []),
    "model.attention": ("model", GPT, "eager", []),
    "tokenizer.kind": ("prepared", BERT, "bpe", []),
    "tokenizer.vocab_size": ("prepared", BERT, 700, []),
    "tokenizer.path": ("prepared", BERT, "/nowhere/vocab", ["tokenizer.train=false", "tokenizer.path=VOCAB"]),
    "tokenizer.hub": ("prepared", BERT, "nobody/no-such-vocabulary", ["tokenizer.train=false", "tokenizer.path=null"]),
    "tokenizer.lowercase": ("prepared", BERT, False, []),
    "tokenizer.train": ("prepared", BERT, False, []),
    "data.corpus": (INFO, "the paper's corpus for this model (Pile blocks, WuDao...), named for the reader"),
    "data.corpus_size": (INFO, "the paper's corpus size, for the reader"),
    "data.path": ("data_sources", BERT, "/nowhere/data", []),
    "data.seq_len": ("samples", BERT, 32, []),
    "data.objective": ("samples", BERT, "clm", []),
    "data.mask_prob": ("samples", BERT, 0.4, []),
    "data.max_ngram": ("samples", BERT, 1, []),
    "data.mask_token_frac": ("samples", BERT, 0.2, []),
    "data.random_token_frac": ("samples", BERT, 0.5, []),
    "data.sop_prob": ("samples", BERT, 0.0, []),
    "data.noise_density": ("samples", T5, 0.3, []),
    "data.mean_span_length": ("samples", T5, 5.0, []),
    "data.num_workers": ("spec", BERT, 3, []),
    **{f"train.{k}": ("spec", BERT, v, []) for k, v in {
        "global_batch": 64, "micro_batch": 2, "max_steps": 77, "lr": 0.123, "min_lr": 1e-3, "warmup_steps": 7,
        "schedule": "constant", "weight_decay": 0.5, "adam_beta1": 0.5, "adam_beta2": 0.5, "adam_eps": 1e-3,
        "grad_clip": 0.5, "precision": "bf16", "activation_checkpointing": False, "compile": True, "log_every": 7,
        "save_every": 7, "keep_last": 7, "max_nonfinite_steps": 7, "seed": 7, "eval_every": 7, "eval_batches": 7,
        "spike_factor": 3.0, "spike_window": 7, "spike_rollback": 7, "hang_timeout_s": 60.0, "hang_factor": 7.0,
        "async_save": True, "peak_tflops": 7.0}.items()},
    "train.grad_accum": ("spec", BERT, 4, ["train.micro_batch=null"]),
    "train.collective_timeout_s": ("pretrain_command", GPT, 7777.0, []),
    **{f"train.loss_scale.{k}": ("spec", BERT, v, ["train.precision=fp16"]) for k, v in {
        "initial_scale_power": 7, "loss_scale_window": 7, "hysteresis": 7, "min_loss_scale": 0.5}.items()},
    **_deepspeed_keys("spec", BERT),
    **{f"cluster.{k}": ("plan_json", "cpm-x-l", v, []) for k, v in {
        "nodes": 3, "gpus_per_node": 4, "gpu_memory_gb": 24.0, "gpu_peak_tflops": 100.0}.items()},
    "downstream.task": ("downstream_jobs", BERT, "qqp", []),
    **{f"downstream.{k}": ("downstream_jobs", BERT, v, ["downstream.task=qqp"]) for k, v in {
        "every": 200, "steps": [100], "last": False, "data_dir": "QQPDIR", "max_steps": 7, "overrides": ["train.lr=0.5"], "launcher": "slurm"}.items()},
    "downstream.slurm_args": ("downstream_jobs", BERT, ["--partition=gpu"], ["downstream.task=qqp",
                                                                             "downstream.launcher=slurm"]),
    "downstream.preset": ("downstream_jobs", BERT, "null", ["downstream.task=qqp", "downstream.data_dir=QQPDIR"]),
    **{f"downstream.{k}": ("downstream_jobs", GPT_EN, v, ["downstream.task=harness", "downstream.harness_tasks=[arc_easy]"])
       for k, v in {"harness_tasks": ["hellaswag"], "include_path": "QQPDIR", "num_fewshot": 2}.items()},
    **{f"paper.{k}": (INFO, "the paper's Table 2/4 figure, compared by `fpm recipes list` and `fpm plan --paper`")
       for k in ("name", "params", "time_hours", "steps", "gpus", "flops_eflops")},
}
FINETUNE = {
    "kind": ("loaded_finetune", "qqp", "pretrain", []),
    "name": (INFO, "the task recipe's name: shown beside the results (the task is task.name)"),
    "description": (INFO, "shown by `fpm recipes show`; free text"),
    "task.name": ("task_split", "qqp", "tnews", []),
    "task.language": ("floor_scores", "qqp", "zh", []),
    "task.fields": ("task_split", "qqp", "[question1]", []),
    "task.num_labels": ("task_score", "tnews", (16, [f"task.labels={[str(i) for i in range(100, 116)]}"]), []),
    "task.labels": ("task_split", "qqp", "['1','0']", []),
    "task.positive_label": ("task_score", "qqp", "'0'", []),
    "task.metric": ("task_score", "qqp", "f1", []),
    "task.hub_dataset": ("fetch", "qqp", "nobody/no-such-set", []),
    "task.hub_config": ("fetch", "qqp", "no-such-config", []),
    "task.max_bad_fraction": ("task_split", "qqp", 0.0, []),
    **{f"train.{k}": ("spec_finetune", "qqp", v, []) for k, v in {
        "batch_size": 8, "lr": 0.5, "warmup_ratio": 0.5, "weight_decay": 0.5, "grad_clip": 0.5, "precision": "bf16",
        "save_every": 7, "keep_last": 7, "log_every": 7, "seed": 7, "max_steps": 7, "eval_every": 7}.items()},
    "train.epochs": ("spec_finetune", "qqp", 0.5, ["train.max_steps=null"]),
    "train.group_by_length": ("training_order", "qqp", False, []),
    "train.max_seq_len": ("classifier", "qqp", 64, []),
    "train.dropout": ("classifier", "qqp", 0.3, []),
    **_deepspeed_keys("spec_finetune", "qqp"),
    "paper": (INFO, "the paper's fine-tuning figures (Table 3, §4.3), shown beside the results"),
}
SWEEP = {
    "kind": ("loaded_sweep", "bert-e-depth", "pretrain", []),
    "name": (INFO, "the sweep recipe's name: the report's title"),
    "description": (INFO, "shown by `fpm recipes show`; free text"),
    **{k: ("sweep", "bert-e-depth", v, []) for k, v in {
        "recipe": "bert-e-s", "task": "tnews", "depths": "[48,50]", "seeds": 3, "controls": False,
        "pretrain_set": "[train.lr=0.5]", "task_set": "[train.lr=0.5]", "bootstrap_samples": 150,
        "confidence": 0.8, "equal_compute": False}.items()},
}
# readers that reach the Hugging Face Hub, offline here: the request they make (named in the error) is the effect
OFFLINE = {"tokenizer.hub", "task.hub_dataset", "task.hub_config"}
TABLES = {"pretrain": (Recipe, PRETRAIN), "finetune": (FinetuneRecipe, FINETUNE), "sweep": (SweepRecipe, SWEEP)}


@pytest.mark.parametrize("kind", list(TABLES))
def test_every_key_of_the_schema_has_a_reader_or_a_reason(kind):
    schema, table = TABLES[kind]
    assert sorted(keys(schema)) == sorted(table), set(keys(schema)) ^ set(table)
    assert all(entry[1] for entry in table.values() if entry[0] == INFO)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared folders (BERT, T5), a corpus, a trained vocabulary, a QQP task and a tiny classifier."""
    from fixtures import prepared as prepare_folder
    from fpm.data.synthetic import write_corpus, write_qqp

    tmp = tmp_path_factory.mktemp("keys")
    _, bert, _ = prepare_folder(tmp, "bert", 150)
    _, t5, _ = prepare_folder(tmp, "t5", 150)
    corpus = write_corpus(tmp / "small.txt", "en", 120)
    vocab = bert / "tokenizer"
    qqp = write_qqp(tmp / "qqp", n_train=200, n_dev=40, n_test=5)
    train = (qqp / "train.tsv").read_text().splitlines()
    train[5] = "x\tonly three\tcolumns"  # one bad row: max_bad_fraction decides
    (qqp / "train.tsv").write_text("\n".join(train) + "\n")
    return {"bert": bert, "t5": t5, "corpus": corpus, "vocab": vocab, "qqp": qqp, "init": _tiny_classifier(tmp),
            "tmp": tmp}


def _tiny_classifier(tmp: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp / "tiny-bert"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "word", "other"]
    (tmp / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(tmp / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=512)).save_pretrained(folder)
    return folder


def read(kind: str, reader: str, name: str, sets: list[str], world: dict, monkeypatch):
    w = world
    sets = [s.replace("VOCAB", str(w["vocab"])).replace("QQPDIR", str(w["qqp"])) for s in sets]
    call = {
        "spec": lambda: spec(name, sets), "spec_finetune": lambda: spec(name, sets, "finetune"),
        "model": lambda: model(name, sets),
        "samples": lambda: samples(name, sets, w["t5"] if name == T5 else w["bert"]),
        "prepared": lambda: prepared(name, sets, _fresh(w["tmp"] / "prepared"), w["corpus"]),
        "pretrain_command": lambda: pretrain_command(name, sets, _fresh(w["tmp"] / "cmd"), monkeypatch),
        "data_sources": lambda: data_sources(name, sets),
        "downstream_jobs": lambda: downstream_jobs(name, sets, _fresh(w["tmp"] / "downstream"), monkeypatch),
        "plan_json": lambda: plan_json(name, sets),
        "sweep": lambda: sweep_dry_run(name, sets, _fresh(w["tmp"] / "sweep")),
        "task_split": lambda: task_split(name, sets, w["qqp"]),
        "training_order": lambda: training_order(name, sets),
        "task_score": lambda: task_score(name, sets),
        "classifier": lambda: classifier(name, sets, w["init"]),
        "floor_scores": lambda: floor_scores(name, sets, w["qqp"], _fresh(w["tmp"] / "floors")),
        "fetch": lambda: fetch(name, sets),
        "loaded": lambda: loaded(name, sets, "pretrain"),
        "loaded_finetune": lambda: loaded(name, sets, "finetune"),
        "loaded_sweep": lambda: loaded(name, sets, "sweep"),
        "default_out": lambda: default_out(name, sets),
    }[reader]
    return call()


def _fresh(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    return folder


CASES = [pytest.param(kind, key, id=f"{kind}:{key}") for kind, (_, table) in TABLES.items()
         for key, entry in table.items() if entry[0] != INFO]


@pytest.mark.e2e  # prepares folders, builds models, plans sweeps: about a minute in all
@pytest.mark.parametrize("kind, key", CASES)
def test_a_poisoned_key_changes_what_its_reader_builds(kind, key, world, monkeypatch):
    reader, name, poison, base = TABLES[kind][1][key]
    poison, also = poison if isinstance(poison, tuple) else (poison, [])  # also: what the poison needs beside it
    value = poison if isinstance(poison, str) else json.dumps(poison)
    as_given = read(kind, reader, name, list(base), world, monkeypatch)
    poisoned = read(kind, reader, name, [*base, f"{key}={value}", *also], world, monkeypatch)
    assert as_given != poisoned, f"{key}={value} changed nothing {reader} built"
    if key not in OFFLINE:  # the recipe as shipped builds: the poisoned value made the difference
        assert not (isinstance(as_given, tuple) and as_given[:1] == ("error",)), (key, as_given)


@pytest.mark.e2e
def test_a_key_cut_from_its_reader_is_caught(world, monkeypatch):
    """The test fails when a key's value stops reaching its reader: here the engine's spec no longer
    passes ``train.weight_decay`` on (the default stays), and the poisoned recipe builds the same."""
    import fpm.engine.spec as engine_spec

    real = engine_spec.pretraining_spec

    def cut(recipe, world_size, flops_per_token):
        s = real(recipe, world_size, flops_per_token)
        return dataclasses.replace(s, weight_decay=0.01)

    monkeypatch.setattr(engine_spec, "pretraining_spec", cut)
    with pytest.raises(AssertionError, match="train.weight_decay=0.5 changed nothing spec built"):
        test_a_poisoned_key_changes_what_its_reader_builds("pretrain", "train.weight_decay", world, monkeypatch)
