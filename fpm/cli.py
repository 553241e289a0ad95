"""The `fpm` command line: one small function per command, parsing only.

Shared options follow one contract: --preset, --set KEY=VALUE (repeatable), --out DIR, --seed N.

Longer than 400 lines: every command's options are declared in its signature (typer), one
small function each, with the shared error handling at the end; there is no logic to move out.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="fpm",
    help="Reproduce and study the FPM model family (BERT, GPT-2 and CPM-2 style) with DeepSpeed.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global_options(
    verbose: Annotated[bool, typer.Option("--verbose", help="Show what libraries print while they start up "
                                                            "(DeepSpeed op builds); also FPM_VERBOSE=1.")] = False,
) -> None:
    """Reproduce and study the FPM model family (BERT, GPT-2 and CPM-2 style) with DeepSpeed."""
    if verbose:
        os.environ["FPM_VERBOSE"] = "1"  # torchrun/srun children inherit it


recipes_app = typer.Typer(help="List and inspect recipes (one per model of the paper's Table 2).",
                          no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
data_app = typer.Typer(help="Tokenizers and corpus preparation (corpus files -> binary token shards).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
checkpoint_app = typer.Typer(help="Checkpoints of a pretraining run.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")

# shared options
Preset = Annotated[Optional[str], typer.Option("--preset", help="Preset to apply, e.g. 'tiny' (CPU-sized).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.lr=3e-4 (repeatable).")]
DataSets = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set "
                                                       "tokenizer.vocab_size=32000 (repeatable).")]
TaskSets = Annotated[Optional[list[str]], typer.Option("--set", help="Override a task recipe key: --set "
                                                       "task.max_bad_fraction=0.01 (repeatable).")]
Out = Annotated[Path, typer.Option("--out", help="Output directory.")]


@recipes_app.command("list")
def recipes_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array instead of a table.")] = False,
    preset: Preset = None,
) -> None:
    """Every model recipe with its parameter count (built on the meta device) beside the paper's."""
    from fpm.commands.recipes import list_recipes

    list_recipes(as_json=as_json, preset=preset)


@recipes_app.command("show")
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name (e.g. bert-e-l, qqp) or a YAML path.")],
    preset: Preset = None,
    sets: Sets = None,
) -> None:
    """Print the fully resolved recipe (bases + preset + overrides) as YAML."""
    from fpm.commands.recipes import show_recipe

    show_recipe(name, preset=preset, overrides=sets or [])


Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed (overrides train.seed).")]
Tracker = Annotated[Optional[list[str]], typer.Option(
    "--tracker", help="wandb or mlflow (repeatable): the metrics, recipe and summary also go there (pip install "
                      "'fpm[track]'; WANDB_MODE=offline and MLflow's store in the run directory need no server).")]


@app.command("pretrain")
def pretrain_cmd(
    recipe: Annotated[str, typer.Argument(help="Model recipe, e.g. bert-e-l (see `fpm recipes list`).")],
    preset: Preset = None,
    sets: Sets = None,
    data: Annotated[Optional[list[str]], typer.Option(
        "--data", help="A prepared folder (fpm data prepare); DIR:WEIGHT, repeated, mixes several by weight.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/RECIPE[-PRESET]).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps (overrides train.max_steps).")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint interval in steps.")] = None,
    seed: Seed = None,
    resume: Annotated[str, typer.Option("--resume", help="auto: continue from the newest intact checkpoint; never.")] = "auto",
    memory_check: Annotated[bool, typer.Option("--memory-check/--no-memory-check", help="Refuse at launch a run "
                                               "whose estimated memory exceeds what the device has (default on).")] = True,
    tracker: Tracker = None,
) -> None:
    """Pretrain a recipe with DeepSpeed (one process, torchrun, srun or the deepspeed launcher).

    Exit codes: 0 done, 2 bad input, 4 loss not finite, 74 disk full or read-only, 75 pre-empted (checkpoint
    saved: rerun to resume), 76 hung (the watchdog dumped the stacks: rerun to resume).
    """
    from fpm.commands.pretrain import pretrain

    code = pretrain(recipe, preset=preset, overrides=sets or [], data=data, out=out, max_steps=max_steps,
                    save_every=save_every, seed=seed, resume=resume, memory_check=memory_check, trackers=tracker or [])
    raise typer.Exit(code)


Task = Annotated[str, typer.Argument(help="qqp (GLUE Quora Question Pairs) or tnews (CLUE), or a task recipe path.")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Task folder in the official layout (see README).")]


@app.command("finetune")
def finetune_cmd(
    task: Task,
    init: Annotated[Path, typer.Option("--init", help="fpm run directory or checkpoint, or a Hugging Face model folder.")],
    data_dir: DataDir = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default runs/finetune-TASK).")] = None,
    preset: Preset = None,
    sets: Sets = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps (overrides epochs).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Epochs over the training split.")] = None,
    seed: Seed = None,
    resume: Annotated[str, typer.Option("--resume", help="auto or never.")] = "auto",
    floors: Annotated[bool, typer.Option("--floors/--no-floors", help="Compute the majority and TF-IDF floors beside the model.")] = True,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="A control: --init's architecture and "
                                               "tokenizer with freshly initialised weights (what pretraining adds).")] = False,
    memory_check: Annotated[bool, typer.Option("--memory-check/--no-memory-check", help="Refuse at launch a run "
                                               "that will not fit in memory (the estimate and the cheapest fix).")] = True,
    tracker: Tracker = None,
) -> None:
    """Fine-tune an encoder on QQP or TNEWS; evaluate on dev, keep the best, write submission files for test."""
    from fpm.commands.finetune import finetune

    raise typer.Exit(finetune(task, init=init, data_dir=data_dir, out=out, preset=preset, overrides=sets or [],
                              max_steps=max_steps, epochs=epochs, seed=seed, resume=resume, with_floors=floors,
                              from_scratch=from_scratch, memory_check=memory_check, trackers=tracker or []))


@app.command("baseline")
def baseline_cmd(
    task: Task,
    data_dir: DataDir = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory.")] = None,
    sets: TaskSets = None,
) -> None:
    """The floors: majority class and TF-IDF + logistic regression, trained on train, scored on dev."""
    from fpm.commands.baseline import baseline_command

    baseline_command(task, data_dir, out, sets or [])


@app.command("evaluate")
def evaluate_cmd(
    task: Annotated[str, typer.Argument(help="qqp or tnews (a fine-tuned classifier), a task recipe path, lm "
                                             "(a pretraining run's loss on held-out text), or harness "
                                             "(lm-evaluation-harness tasks on a GPT or T5 run or export).")],
    model: Annotated[Path, typer.Option("--model", help="qqp/tnews: a fine-tuned classifier (fpm finetune OUT dir or "
                                        "a HF folder); lm: a pretraining run directory; harness: a GPT/T5 run "
                                        "directory or exported folder.")],
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="qqp/tnews: the task folder (official "
                                                     "layout); lm: a prepared folder with a validation part "
                                                     "(default: the run's own).")] = None,
    split: Annotated[str, typer.Option("--split", help="qqp/tnews: dev (scored) or test (submission file only).")] = "dev",
    out: Annotated[Optional[Path], typer.Option("--out", help="Where results (and predictions) go.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="lm, harness: a checkpoint tag (step-00000100); "
                                                      "default the newest intact one.")] = None,
    batches: Annotated[Optional[int], typer.Option("--batches", help="lm: global batches of the validation part "
                                                   "to score (default: the run's train.eval_batches).")] = None,
    preset: Preset = None,
    sets: Sets = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="harness: comma-separated lm-evaluation-harness "
                                                 "tasks (its registry, or local task files with --include-path).")] = None,
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="harness: a folder of local task "
                                                         "YAML files.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="harness: examples in context.")] = None,
    limit: Annotated[Optional[float], typer.Option("--limit", help="harness: documents per task (or a fraction).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="harness: the batch size.")] = 8,
    log_samples: Annotated[bool, typer.Option("--log-samples", help="harness: keep every request's response in "
                                              "the results file.")] = False,
) -> None:
    """Evaluate a fine-tuned classifier, a pretrained language model on held-out text (lm), or a GPT/T5
    model on lm-evaluation-harness tasks (harness), without training."""
    if task == "harness":
        from fpm.commands.evaluate import evaluate_harness

        evaluate_harness(model, tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()],
                         include_path=include_path, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                         tag=checkpoint, out=out, log_samples=log_samples)
        return
    if task == "lm":
        from fpm.commands.evaluate import evaluate_lm

        evaluate_lm(model, data_dir=data_dir, tag=checkpoint, batches=batches, out=out)
        return
    from fpm.commands.evaluate import evaluate_command

    evaluate_command(task, model_path=model, data_dir=data_dir, split=split, out=out, preset=preset,
                     overrides=sets or [])


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


# SLURM options, declared once: fpm slurm render|submit and fpm sweep-depth --executor slurm
SlurmKind = Annotated[str, typer.Option("--kind", help="pretrain, finetune or sweep.")]
SlurmNodes = Annotated[int, typer.Option("--nodes", help="Nodes.")]
SlurmGpus = Annotated[int, typer.Option("--gpus-per-node", help="GPUs per node (0: CPU tasks over gloo).")]
SlurmTasks = Annotated[Optional[int], typer.Option("--tasks-per-node", help="Processes per node (default: one per GPU).")]
SlurmCpus = Annotated[Optional[int], typer.Option("--cpus-per-task", help="CPUs per process.")]
SlurmArgs = Annotated[Optional[list[str]], typer.Argument(help="Arguments passed on to the fpm command.")]
SlurmPartition = Annotated[Optional[str], typer.Option("--partition", help="The partition (sbatch --partition).")]
SlurmTime = Annotated[Optional[str], typer.Option("--time", help="A job's time limit (sbatch --time, e.g. 2-00:00:00).")]
SlurmAccount = Annotated[Optional[str], typer.Option("--account", help="The account charged (sbatch --account).")]


@app.command("sweep-depth")
def sweep_depth_cmd(
    recipe: Annotated[str, typer.Argument(help="A model recipe (bert-e-l) or a sweep recipe (bert-e-depth).")],
    task: Annotated[Optional[str], typer.Option("--task", help="qqp or tnews (default: the sweep recipe's).")] = None,
    depths: Annotated[Optional[str], typer.Option("--depths", help="Comma-separated depths, e.g. 50,60,70,80,90.")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Seeds per depth.")] = None,
    preset: Preset = None,
    sets: Sets = None,
    task_sets: Annotated[Optional[list[str]], typer.Option("--task-set", help="Override a task recipe key (repeatable).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Prepared pretraining shards (default: synthetic, tiny only).")] = None,
    data_dir: DataDir = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Sweep directory.")] = None,
    executor: Annotated[str, typer.Option("--executor", help="local (cells one by one here) or slurm (a job per cell).")] = "local",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, the commands and the scripts; run nothing.")] = False,
    nodes: Annotated[int, typer.Option("--nodes", help="slurm: nodes per pretraining job.")] = 1,
    gpus_per_node: SlurmGpus = 0,
    cpus_per_task: SlurmCpus = None,
    partition: SlurmPartition = None,
    time_limit: SlurmTime = None,
    account: SlurmAccount = None,
    controls: Annotated[Optional[bool], typer.Option("--controls/--no-controls", help="Also fine-tune each depth's "
                        "architecture from scratch (first seed): what pretraining adds (default: the sweep recipe's, on).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, help="local: cells at once, each on its share of the "
                    "cores (default: one per core for --preset tiny without a GPU, else 1).")] = None,
    equal_compute: Annotated[Optional[bool], typer.Option("--equal-compute/--no-equal-compute", help="Also fine-tune "
                             "each deeper cell's checkpoint at the shallowest depth's compute: the report compares "
                             "depths at equal compute too (default: the sweep recipe's, on).")] = None,
) -> None:
    """The paper's depth study: pretrain at each depth, fine-tune, evaluate on dev, report with error bars."""
    from fpm.commands.sweep import sweep_depth

    code = sweep_depth(recipe, task=task, depths=_ints(depths), seeds=seeds, preset=preset, out=out, data=data,
                       data_dir=data_dir, executor=executor, dry_run=dry_run, pretrain_sets=sets or [],
                       task_sets=task_sets or [], controls=controls, jobs=jobs, equal_compute=equal_compute,
                       slurm_options={"nodes": nodes, "gpus_per_node": gpus_per_node, "partition": partition,
                                      "time": time_limit, "account": account, "cpus_per_task": cpus_per_task})
    raise typer.Exit(code)


@app.command("report")
def report_cmd(folder: Annotated[Path, typer.Argument(help="A sweep directory (fpm sweep-depth --out) or a "
                                                     "pretraining run directory (fpm pretrain --out).")]) -> None:
    """A sweep's report (report.md, report.html, plots, results.json from its cell files), or one run's:
    losses, downstream scores, throughput and MFU, spikes and restarts."""
    from fpm.commands.report import report_command

    report_command(folder)


@app.command("plan")
def plan_cmd(
    recipe: Annotated[Optional[str], typer.Argument(help="Model recipe (omit with --paper).")] = None,
    nodes: Annotated[Optional[int], typer.Option("--nodes", help="Nodes (default: the recipe's cluster.nodes).")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option("--gpus-per-node", help="GPUs per node (default: cluster.gpus_per_node).")] = None,
    gpu_memory: Annotated[Optional[float], typer.Option("--gpu-memory", help="GB per GPU (default: cluster.gpu_memory_gb).")] = None,
    cpu_memory: Annotated[float, typer.Option("--cpu-memory", help="Host GB per node, for CPU offload (DGX A100: 1024).")] = 1024.0,
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", help="Check this micro batch only.")] = None,
    mfu: Annotated[float, typer.Option("--mfu", help="Model FLOPs utilisation assumed for time estimates.")] = 0.40,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    paper: Annotated[bool, typer.Option("--paper", help="The paper's Table 4 beside fpm's own accounting.")] = False,
    preset: Preset = None,
    sets: Sets = None,
) -> None:
    """Memory per GPU (ZeRO 0-3, offload, activations), the largest micro batch, FLOPs, time and a recommendation."""
    from fpm.commands.plan import plan_command

    plan_command(recipe, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory=gpu_memory, micro_batch=micro_batch,
                 as_json=as_json, paper=paper, mfu=mfu, preset=preset, overrides=sets or [], cpu_memory=cpu_memory)


slurm_app = typer.Typer(help="Batch scripts for SLURM clusters (templates in slurm/).", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")


def _slurm(kind, name, fpm_args, out, dry_run, submit, nodes, gpus_per_node, tasks_per_node, partition, time_limit,
           account, cpus_per_task=None):
    from fpm.commands.slurm import slurm_command

    return slurm_command(kind, name, fpm_args or [], out=out, dry_run=dry_run, submit=submit, nodes=nodes,
                         gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node, partition=partition,
                         time=time_limit, account=account, cpus_per_task=cpus_per_task)


@slurm_app.command("render", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def slurm_render(
    name: Annotated[str, typer.Argument(help="Recipe (pretrain, sweep) or task (finetune).")],
    fpm_args: SlurmArgs = None,
    kind: SlurmKind = "pretrain",
    nodes: SlurmNodes = 2,
    gpus_per_node: SlurmGpus = 8,
    tasks_per_node: SlurmTasks = None,
    cpus_per_task: SlurmCpus = None,
    partition: SlurmPartition = None,
    time_limit: SlurmTime = None,
    account: SlurmAccount = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Script file to write.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the script instead of writing it.")] = False,
) -> None:
    """Write a ready batch script for a recipe and cluster shape (arguments after -- go to fpm)."""
    _slurm(kind, name, fpm_args, out, dry_run, False, nodes, gpus_per_node, tasks_per_node, partition, time_limit,
           account, cpus_per_task)


@slurm_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def slurm_submit(
    name: Annotated[str, typer.Argument(help="Recipe (pretrain, sweep) or task (finetune).")],
    fpm_args: SlurmArgs = None,
    kind: SlurmKind = "pretrain",
    nodes: SlurmNodes = 2,
    gpus_per_node: SlurmGpus = 8,
    tasks_per_node: SlurmTasks = None,
    cpus_per_task: SlurmCpus = None,
    partition: SlurmPartition = None,
    time_limit: SlurmTime = None,
    account: SlurmAccount = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Script file to write before submitting.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the script and the sbatch command only.")] = False,
) -> None:
    """Render a batch script and submit it with sbatch."""
    _slurm(kind, name, fpm_args, out, dry_run, True, nodes, gpus_per_node, tasks_per_node, partition, time_limit,
           account, cpus_per_task)


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="An fpm run directory (with checkpoints/).")],
    out: Annotated[Path, typer.Option("--out", help="Hugging Face folder to write.")],
    tag: Annotated[Optional[str], typer.Option("--tag", help="Checkpoint, e.g. step-00000300 (default: latest).")] = None,
) -> None:
    """Consolidate a (ZeRO) checkpoint into a Hugging Face folder that plain transformers loads."""
    from fpm.commands.export import export

    export(run_dir, out, tag)


@app.command("generate")
def generate_cmd(
    model: Annotated[Path, typer.Argument(help="A GPT or T5 pretraining run directory, or a folder fpm export wrote.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="A prompt (repeatable); T5: <s_0>, "
                                                        "<s_1>... mark spans to fill in.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="A file: a prompt per line, or JSON lines "
                                                    "with \"prompt\" or \"turns\".")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the JSON lines here (default: standard output).")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="A run's checkpoint tag (default: the "
                                                      "newest intact one).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; above 0: sampling.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sampling: keep the k likeliest tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Sampling: keep the smallest set of tokens with this "
                                         "probability.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="Above 1 discourages repeats.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    dialogue: Annotated[bool, typer.Option("--dialogue", help="CPM-X-EVA: a prompt is a dialogue's turns (tab-"
                                           "separated in a file); the reply is one line.")] = False,
) -> None:
    """Generate text with a GPT or T5 model (transformers' generate with fpm's tokenizer)."""
    from fpm.commands.generate import Sampling, generate_command

    generate_command(model, prompts=prompt or [], prompts_file=prompts, out=out, tag=checkpoint,
                     sampling=Sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed),
                     dialogue=dialogue)


@checkpoint_app.command("convert")
def checkpoint_convert(
    run_dir: Annotated[Path, typer.Argument(help="A pretraining run directory.")],
    tag: Annotated[Optional[str], typer.Option("--tag", help="A checkpoint tag (default: the newest intact one).")] = None,
) -> None:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, which resumes at any world size and
    ZeRO stage 1-3 (a resume on another shape converts by itself)."""
    from fpm.commands.checkpoint import convert_command

    convert_command(run_dir, tag)


@checkpoint_app.command("verify")
def checkpoint_verify(
    run_dir: Annotated[Path, typer.Argument(help="A pretraining run directory.")],
    tag: Annotated[Optional[str], typer.Option("--tag", help="A checkpoint tag (default: every complete one).")] = None,
) -> None:
    """Check every file of a run's checkpoints against the sizes and CRC32s of their seals, in one
    process (a resume checks sizes and each rank's share of the checksums)."""
    from fpm.commands.checkpoint import verify_command

    verify_command(run_dir, tag)


@data_app.command("prepare")
def data_prepare(
    recipe: Annotated[str, typer.Argument(help="Recipe whose tokenizer and objective to prepare for.")],
    inputs: Annotated[list[Path], typer.Option("--input", help="Corpus file (repeatable).")],
    out: Out,
    preset: Preset = None,
    sets: DataSets = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, pile (JSON lines, .zst ok), wudao, stc or text.")] = "auto",
    text_mode: Annotated[str, typer.Option("--text-mode", help="Plain text: one document per 'line' or per blank-line 'paragraph'.")] = "line",
    text_field: Annotated[str, typer.Option("--text-field", help="JSON field holding the text (pile format).")] = "text",
    workers: Annotated[int, typer.Option("--workers", help="Tokenizer worker processes (0: in-process).")] = max(1, os.cpu_count() or 1),
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", help="Tokens per shard.")] = 1 << 27,
    validation: Annotated[float, typer.Option("--validation", help="Share of the documents held out for validation, "
                                              "chosen by a hash of their text (e.g. 0.01).")] = 0.0,
    validation_tokens: Annotated[int, typer.Option("--validation-tokens", help="Instead of --validation: hold out "
                                                   "about this many tokens (documents chosen by hash).")] = 0,
    validation_inputs: Annotated[list[Path] | None, typer.Option(
        "--validation-input", help="A file held out whole as validation data (repeatable).")] = None,
) -> None:
    """Tokenize corpus files into memory-mapped binary shards with a manifest (resumable)."""
    from fpm.commands.data import prepare_command

    prepare_command(recipe, inputs, out, preset=preset, overrides=sets or [], fmt=fmt, text_mode=text_mode,
                    text_field=text_field, workers=workers, shard_tokens=shard_tokens, validation=validation,
                    validation_inputs=validation_inputs or [], validation_tokens=validation_tokens)


@data_app.command("verify")
def data_verify(
    folder: Annotated[Path, typer.Argument(help="A prepared folder (fpm data prepare --out).")],
) -> None:
    """Check every shard file against the sizes and checksums recorded when it was written, the
    index offsets and every token id (exit 2 naming the first damaged file)."""
    from fpm.commands.data import verify_command

    verify_command(folder)


@data_app.command("audit")
def data_audit(
    task: Task,
    data_dir: DataDir = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write audit.json here.")] = None,
    sets: TaskSets = None,
) -> None:
    """Label distribution, duplicates within train and between train and dev/test, empty fields, lengths."""
    from fpm.commands.data import audit_command

    audit_command(task, data_dir, out, sets or [])


@data_app.command("fetch-task")
def data_fetch_task(
    task: Task,
    out: Out,
) -> None:
    """Download QQP or TNEWS from the Hugging Face Hub once and write the official file layout
    (for offline compute nodes: run this where there is internet, then pass --data-dir)."""
    from fpm.commands.data import fetch_task_command

    fetch_task_command(task, out)


@data_app.command("train-tokenizer")
def data_train_tokenizer(
    kind: Annotated[str, typer.Option("--kind", help="wordpiece, bpe, unigram or cpm2.")],
    inputs: Annotated[list[Path], typer.Option("--input", help="Plain-text training file (repeatable).")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Exact vocabulary size.")],
    out: Out,
    lowercase: Annotated[bool, typer.Option("--lowercase/--no-lowercase", help="Lowercase the text (as BERT uncased does) before training and when encoding.")] = False,
    language: Annotated[str, typer.Option("--language", help="en or zh (zh: jieba word boundaries).")] = "en",
) -> None:
    """Train a vocabulary of an exact size from text with `tokenizers`."""
    from fpm.commands.data import train_tokenizer_command

    train_tokenizer_command(kind, inputs, vocab_size, out, lowercase, language)


def _quiet_libraries() -> None:
    """Library chatter (progress bars, config warnings) is noise in fpm's output and SLURM logs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.utils._pytree.*")


# commands that train or evaluate models run on tcmalloc/jemalloc where installed (fpm/cpu/allocator.py)
_ALLOCATOR_COMMANDS = {"pretrain", "finetune", "evaluate", "sweep-depth"}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _click_kind(exc: BaseException) -> str | None:
    """Which click exception ``exc`` is, by class name: typer raises its own vendored click
    classes (typer._click), which are not subclasses of the ``click`` package's."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    for kind in ("NoArgsIsHelpError", "UsageError", "ClickException", "Exit", "Abort"):
        if kind in names:
            return kind
    return None


def _usage_error(exc) -> int:
    """A usage error on one line, the command's usage on the next; exit 2."""
    message = exc.format_message().strip().splitlines()
    print(f"error: {message[0] if message else 'bad usage'}", file=sys.stderr)
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        usage = " ".join(ctx.get_usage().split())  # one line, whatever the terminal width
        usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), usage.replace("Usage: ", "usage: ", 1))
        print(f"{usage}  (see: {ctx.command_path} --help)", file=sys.stderr)
    return int(getattr(exc, "exit_code", 2) or 2)


def main() -> None:
    from fpm.errors import EXIT_ABORTED, exit_for

    _quiet_libraries()
    try:
        if _command_of(sys.argv[1:]) in _ALLOCATOR_COMMANDS:
            from fpm.cpu import allocator

            allocator.reexec()
        code = app(prog_name="fpm", standalone_mode=False)  # typer.Exit's code is returned, not raised
        if isinstance(code, int) and code:
            sys.exit(code)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(EXIT_ABORTED)
    except Exception as exc:  # click's exceptions arrive here in non-standalone mode
        kind = _click_kind(exc)
        if kind == "NoArgsIsHelpError":  # the help text has been printed
            sys.exit(2)
        if kind in ("UsageError", "ClickException"):
            sys.exit(_usage_error(exc) if kind == "UsageError" else _plain_click_error(exc))
        if kind == "Exit":
            sys.exit(exc.exit_code)
        if kind == "Abort":
            print("aborted", file=sys.stderr)
            sys.exit(EXIT_ABORTED)
        known = exit_for(exc)  # fpm's errors, refused writes, collective timeouts (fpm/errors.py)
        if known is None:
            raise
        print(f"error: {known[1]}", file=sys.stderr)
        sys.exit(known[0])


def _plain_click_error(exc) -> int:
    print(f"error: {exc.format_message()}", file=sys.stderr)
    return int(getattr(exc, "exit_code", 1) or 1)
