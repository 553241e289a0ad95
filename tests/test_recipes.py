"""Recipes: every shipped file validates, bad ones fail with one clear line, presets and --set resolve."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fpm.config import load_recipe, recipe_files
from fpm.config.schema import derive_batch
from fpm.engine.precision import Hardware, choose
from fpm.errors import FpmError
from fpm.models import count_params
from fpm.paper import TABLE2_ORDER

from conftest import ROOT

ALL = sorted(recipe_files())
MODELS = sorted(recipe_files("pretrain"))


def test_twenty_model_recipes_one_per_table2_row():
    assert sorted(MODELS) == sorted(TABLE2_ORDER)
    assert len(MODELS) == 20


@pytest.mark.parametrize("name", ALL)
def test_every_shipped_recipe_validates_with_and_without_tiny(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    tiny = load_recipe(name, preset="tiny")
    assert tiny.name == name


def _paper_csv() -> dict[str, float]:
    """Table 2 as printed (e.g. '687.5M', '1.1B'), transcribed here independently of the recipes."""
    text = """BERT-C 330M|BERT-E-S 687.5M|BERT-E-M 825M|BERT-E-L 962.5M|BERT-E-X 1.1B|BERT-E-E 1.24B|
    BERT-X-CN-S 495M|BERT-X-EN-S 495M|BERT-X-EN-M 687.5M|CPM-X-S 2.9B|CPM-X-M 5.1B|CPM-X-L 10.3B|
    CPM-X-EVA 2.9B|EPM-X-S 2.9B|EPM-X-M 4B|EPM-X-L 5.1B|EPM-X-X 6.4B|CPM-2-X-S 2.9B|CPM-2-X-M 5.6B|EPM-2-X-S 2.9B"""
    out = {}
    for item in text.replace("\n", "").split("|"):
        name, size = item.split()
        out[name.lower()] = float(size[:-1]) * (1e9 if size.endswith("B") else 1e6)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_param_count_matches_table2(name):
    recipe = load_recipe(name)
    paper = _paper_csv()[name]
    assert recipe.paper.params == pytest.approx(paper)
    n = count_params(recipe)
    tolerance = 0.08 if recipe.model.family == "bert" else 0.03
    assert abs(n - paper) / paper <= tolerance, f"{name}: {n / 1e6:.1f}M vs paper {paper / 1e6:.1f}M"


def test_table2_architecture_fields():
    r = load_recipe("bert-e-l")
    assert (r.model.n_layers, r.model.d_model, r.model.n_heads, r.model.d_head) == (70, 1024, 16, 64)
    g = load_recipe("cpm-x-l")
    assert (g.model.n_layers, g.model.d_model, g.model.n_heads, g.model.d_head) == (128, 2560, 32, 80)
    t = load_recipe("cpm-2-x-m")
    assert (t.model.n_encoder_layers, t.model.n_decoder_layers, t.model.n_layers) == (12, 12, 24)
    assert (t.model.d_model, t.model.n_heads, t.model.d_head) == (4096, 64, 64)
    assert load_recipe("epm-2-x-s").model.n_encoder_layers == 6


def test_section_4_1_hyperparameters_come_from_family_bases():
    g = load_recipe("epm-x-s").train
    assert (g.global_batch, g.max_steps, g.lr, g.warmup_steps, g.schedule, g.min_lr) == (512, 300000, 1.5e-4, 3000, "cosine", 1e-5)
    assert load_recipe("epm-x-s").data.seq_len == 1024
    b = load_recipe("bert-e-s")
    assert (b.train.global_batch, b.train.lr, b.train.warmup_steps, b.train.schedule) == (1024, 1e-4, 10000, "linear")
    assert b.tokenizer.vocab_size == 30522 and b.data.objective == "mlm_sop" and b.data.max_ngram == 3
    for name in MODELS:
        r = load_recipe(name)
        assert r.train.weight_decay == 0.01 and r.train.grad_clip == 1.0
        assert r.model.dropout == 0.1 and r.model.scale_residual_init and r.train.activation_checkpointing
        # mixed precision on the paper's DGX A100s (compute capability 8.0): auto picks bf16 there
        assert r.train.precision == "auto"
        assert choose(r.train.precision, Hardware("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))).precision == "bf16"
    # shared values are inherited, not copied: only the family bases mention the learning rate
    files_with_lr = [p.name for p in (ROOT / "recipes").rglob("*.yaml") if "\n  lr:" in p.read_text()]
    assert sorted(set(files_with_lr)) == ["_base.yaml", "qqp.yaml", "tnews.yaml"]


def test_table4_steps_and_gpus_recorded():
    r = load_recipe("cpm-2-x-m")
    assert (r.paper.steps, r.paper.gpus, r.paper.time_hours, r.paper.flops_eflops) == (80000, 8, 138, 1240)
    assert load_recipe("bert-x-en-s").paper.steps == 2_800_000


# ------------------------------------------------------------------ presets and overrides


def test_tiny_preset_shrinks_and_keeps_depth_ratios():
    depths = {n: load_recipe(n, preset="tiny").model.n_layers for n in ("bert-e-s", "bert-e-l", "bert-e-e")}
    assert depths == {"bert-e-s": 5, "bert-e-l": 7, "bert-e-e": 9}
    tiny = load_recipe("cpm-x-l", preset="tiny")
    assert tiny.model.n_layers == 13 and tiny.model.d_model == 64 and tiny.data.seq_len <= 128
    assert tiny.tokenizer.vocab_size <= 2048 and tiny.tokenizer.train
    t5 = load_recipe("cpm-2-x-m", preset="tiny").model
    assert (t5.n_encoder_layers, t5.n_decoder_layers) == (4, 4)


def test_set_overrides_apply_after_preset_with_types():
    r = load_recipe("bert-e-l", preset="tiny", overrides=["train.lr=3e-4", "model.n_layers=3", "train.precision=bf16"])
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.model.n_layers == 3 and r.train.precision == "bf16"


def test_pre_overrides_apply_before_the_preset_scales_depth():
    r = load_recipe("bert-e-l", preset="tiny", pre_overrides=["model.n_layers=60"])
    assert r.model.n_layers == 6


@pytest.mark.parametrize("override, fragment", [
    ("train.lrr=1", "unknown key 'train.lrr' in 'train' (did you mean 'lr'?)"),
    ("trian.lr=1", "unknown key 'trian.lr' (did you mean 'train'?)"),
    ("train.lr=abc", "--set train.lr: Input should be a valid number"),
    ("model.n_heads=7", "n_heads=7 does not divide d_model=1024"),
    ("train.precision=fp8", "train.precision"),
    ("model.n_layers.x=1", "'model.n_layers' has no sub-keys"),
    ("nokey", "expected KEY=VALUE"),
])
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(FpmError) as exc:
        load_recipe("bert-e-l", overrides=[override])
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


BASE = str(ROOT / "recipes" / "bert" / "_en.yaml")


@pytest.mark.parametrize("body, fragment", [
    (f"base: {BASE}\nmodel:\n  n_layers: 4\n  n_head: 4\ntrain:\n  max_steps: 10\n",
     "bad.yaml:4: unknown key 'model.n_head' (did you mean 'n_heads'?)"),
    (f"base: {BASE}\nmodel:\n  n_layers: four\ntrain:\n  max_steps: 10\n",
     "bad.yaml:3: model.n_layers: Input should be a valid integer"),
    (f"base: {BASE}\nmodel:\n  n_layers: 4\n  d_head: 32\ntrain:\n  max_steps: 10\n",
     "n_heads * d_head = 512 must equal d_model=1024"),
    (f"base: {BASE}\nmodel:\n  n_layers: 4\ntrain:\n  max_steps: 10\n  min_lr: 0.5\n",
     "min_lr=0.5 is larger than lr=0.0001"),
    (f"base: {BASE}\nmodel:\n  n_layers: 4\n", "missing required key 'train.max_steps'"),
    ("model:\n  n_layers: [\n", "bad.yaml:3: invalid YAML"),
    ("base: nothere.yaml\n", "base file not found: nothere.yaml"),
    (f"base: {BASE}\nmodel:\n  n_layers: 4\n  n_layers: 5\n", "bad.yaml:4: key 'n_layers' appears twice"),
    (f"base: {BASE}\nmodel:\n  n_layers: 4\ntrain:\n  max_steps: 10\n  warmup_steps: 1\ndata:\n  objective: clm\n",
     "data.objective=clm does not fit family bert"),
    (f"base: {BASE}\nkind: pretrian\n", "unknown kind 'pretrian' (did you mean 'pretrain'?)"),
])
def test_bad_recipe_files_name_file_line_and_key(tmp_path, monkeypatch, body, fragment):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "bad.yaml", body)
    with pytest.raises(FpmError) as exc:
        load_recipe(str(path))
    msg = str(exc.value)
    assert fragment in msg, msg
    assert "\n" not in msg


def test_circular_bases_are_reported(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(FpmError, match="circular base"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_unknown_recipe_and_preset_suggest_names():
    with pytest.raises(FpmError, match=r"unknown recipe 'bert-e-ll' \(did you mean 'bert-e-l'\?\)"):
        load_recipe("bert-e-ll")
    with pytest.raises(FpmError, match=r"unknown preset 'tinny' \(did you mean 'tiny'\?\)"):
        load_recipe("bert-e-l", preset="tinny")


@pytest.mark.parametrize("g, m, a, ws, expected", [
    (1024, 16, None, 8, (1024, 16, 8)),
    (1024, None, 8, 8, (1024, 16, 8)),
    (None, 16, 8, 8, (1024, 16, 8)),
    (16, None, 1, 2, (16, 8, 1)),
])
def test_batch_triple_is_derived(g, m, a, ws, expected):
    assert derive_batch(g, m, a, ws) == expected


@pytest.mark.parametrize("g, m, a, ws", [(1024, 16, 4, 8), (1000, 16, None, 8), (10, None, 3, 1)])
def test_inconsistent_batch_triple_is_an_error(g, m, a, ws):
    with pytest.raises(ValueError):
        derive_batch(g, m, a, ws)


def test_task_and_sweep_recipes():
    qqp = load_recipe("qqp")
    assert qqp.task.fields == ["question1", "question2"] and qqp.task.positive_label == "1"
    tnews = load_recipe("tnews")
    assert tnews.task.num_labels == 15 and "105" not in tnews.task.labels and "111" not in tnews.task.labels
    assert load_recipe("tnews", overrides=["task.fields=[sentence,keywords]"]).task.fields == ["sentence", "keywords"]
    sweep = load_recipe("bert-e-depth")
    assert sweep.depths == [50, 60, 70, 80, 90] and sweep.recipe == "bert-e-l"
    assert load_recipe("bert-e-depth", preset="tiny").depths == [50, 70, 90]


# ------------------------------------------------------------------ CLI


def test_cli_recipes_list_json(cli):
    proc = cli("recipes", "list", "--json", check=True)
    rows = json.loads(proc.stdout)
    assert len(rows) == 20
    keys = {"name", "family", "language", "n_layers", "d_model", "n_heads", "d_head", "params", "paper_params"}
    assert all(set(row) == keys for row in rows)
    assert [r["name"] for r in rows] == TABLE2_ORDER
    by_name = {r["name"]: r for r in rows}
    assert by_name["cpm-x-l"]["n_layers"] == 128 and by_name["cpm-2-x-s"]["n_layers"] == 12


def test_cli_recipes_list_table_and_show(cli):
    table = cli("recipes", "list", check=True).stdout
    assert "bert-e-l" in table and "962.5M" in table and "12 (6+6)" in table
    shown = cli("recipes", "show", "bert-e-l", "--preset", "tiny", "--set", "train.lr=0.002", check=True).stdout
    import yaml

    data = yaml.safe_load(shown)
    assert data["model"]["n_layers"] == 7 and data["train"]["lr"] == 0.002


def test_cli_errors_are_one_line_without_traceback(cli):
    proc = cli("recipes", "show", "bert-e-l", "--set", "model.n_haeds=8")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'n_heads'" in lines[0]


def test_task_recipes_quote_the_papers_figures_as_fpm_paper_holds_them():
    """The fine-tuning recipes' ``paper:`` blocks repeat Table 3 and §4.3 for the results table; they
    must say what fpm/paper.py (the one home of the published numbers) says."""
    from fpm.paper import TABLE3_QQP_DEV, TNEWS_BERT_C_ACCURACY

    qqp = load_recipe("qqp", kind="finetune").paper
    assert {k: qqp[k] for k in ("accuracy", "f1", "precision", "recall")} == {
        k: TABLE3_QQP_DEV[70][k] for k in ("accuracy", "f1", "precision", "recall")}
    assert load_recipe("tnews", kind="finetune").paper["accuracy"] == TNEWS_BERT_C_ACCURACY
