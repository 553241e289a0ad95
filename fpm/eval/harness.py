"""`fpm evaluate harness --model MODEL --tasks T1,T2`: EleutherAI's lm-evaluation-harness on a GPT or
T5 model, through the harness's own Hugging Face model class (``hf``: causal for GPT, seq2seq for
T5), with fpm's tokenizer.

``MODEL`` is an exported folder (`fpm export`) or a run directory, whose checkpoint (``--checkpoint``,
default the newest intact one) is exported once into ``RUN/harness/model-step-N/`` and reused. The
call is :func:`lm_eval.simple_evaluate` with ``model="hf"`` and the harness's own defaults (seeds,
batching), so the numbers are those of ``lm_eval --model hf --model_args pretrained=FOLDER,dtype=float32``
on the same folder and tasks. Tasks come from the harness's registry or from local task files
(``--include-path DIR``: YAML task configs, e.g. over a local JSON data file — offline). Results
are written as JSON (``--out``; for a run directory ``RUN/harness/results-step-N.json``, also
summarised in ``run.json``'s ``harness``).

The harness is an optional extra (``pip install 'fpm[eval]'``): the core install does without it.
Vocabularies with no ``tokenizers`` form (CPM's jieba pre-segmentation) cannot be loaded by the
harness's HF class and are refused; ``fpm evaluate lm`` scores those on held-out text.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fpm.errors import FpmError
from fpm.rundir import RunDir

INSTALL = "pip install 'fpm[eval]'"
BACKEND = {"gpt": "causal", "t5": "seq2seq"}


def check_installed() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise FpmError(f"fpm evaluate harness needs EleutherAI's lm-evaluation-harness: {INSTALL}")


def model_folder(model: Path, tag: str | None = None) -> tuple[Path, str, Path | None]:
    """(the Hugging Face folder to evaluate, its family, the run directory or None)."""
    import yaml

    model = Path(model)
    if not model.exists():
        raise FpmError(f"--model {model}: not found")
    run = None
    if RunDir(model).is_pretraining_run():
        from fpm.engine import checkpoint as ckpt
        from fpm.runs import export_run

        run = model
        if tag is None:
            found = ckpt.find_resumable(RunDir(run).checkpoints)
            if found is None:
                raise FpmError(f"{run}: no complete checkpoint to evaluate")
            tag = found[0].name
        model = run / "harness" / f"model-{tag}"
        if not (model / "fpm_recipe.yaml").is_file():  # written last by the export: a complete one
            if model.exists():
                import shutil

                shutil.rmtree(model)
            export_run(run, model, tag)
    if not (model / "config.json").is_file():
        raise FpmError(f"--model {model}: neither an fpm run directory nor a Hugging Face model folder")
    recipe = model / "fpm_recipe.yaml"
    family = ((yaml.safe_load(recipe.read_text()) or {}).get("model") or {}).get("family") if recipe.is_file() else None
    if family is None:  # a folder fpm did not export: the harness's class decides from its config
        family = "t5" if json.loads((model / "config.json").read_text()).get("is_encoder_decoder") else "gpt"
    if family not in BACKEND:
        raise FpmError(f"--model {model}: a {family} model; the harness scores generative models (GPT, T5) — "
                       "fine-tune BERT encoders (fpm finetune, or downstream: in the recipe)")
    if not (model / "tokenizer.json").is_file():
        raise FpmError(f"--model {model}: its vocabulary has no tokenizers form (tokenizer.json) that the "
                       "harness's Hugging Face class can load (CPM's jieba vocabularies); score it with "
                       "fpm evaluate lm")
    return model, family, run


def evaluate(model: Path, tasks: list[str], *, include_path: Path | None = None, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int = 8, tag: str | None = None, out: Path | None = None,
             log_samples: bool = False) -> dict:
    """Run the harness; its results (``results``, ``n-shot``, ``versions``, ``configs`` and, with
    ``log_samples``, ``samples``) as written to the JSON file."""
    check_installed()
    if not tasks:
        raise FpmError("--tasks: name at least one harness task (comma-separated)")
    if include_path is not None and not Path(include_path).is_dir():
        raise FpmError(f"--include-path {include_path}: no such folder")
    folder, family, run = model_folder(model, tag)
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from fpm.engine.distributed import cpu_threads

    torch.set_num_threads(cpu_threads(1))  # as a training process takes them (FPM_THREADS, SLURM, the cores)

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise FpmError(f"--tasks: unknown harness task(s) {', '.join(unknown)} (local task files: --include-path DIR)")
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32",
                                                         "backend": BACKEND[family]},
                                  tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                  device="cuda" if torch.cuda.is_available() else "cpu", task_manager=manager,
                                  log_samples=log_samples)
    keep = {k: res[k] for k in ("results", "n-shot", "versions", "configs", "samples") if k in res}
    keep["model"] = str(folder)
    if out is None:
        out = (run / "harness" / f"results-{folder.name.removeprefix('model-')}.json") if run else folder / "harness.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(keep, indent=1, default=str))
    if run is not None:
        harness = RunDir(run).status().get("harness") or {}
        harness[folder.name.removeprefix("model-")] = {t: _numbers(m) for t, m in keep["results"].items()}
        RunDir(run).write_status(harness=harness)
    return {**keep, "out": str(out)}


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
