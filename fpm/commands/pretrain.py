"""`fpm pretrain RECIPE`: wire recipe + data + model + engine together.

The run directory is the unit of state: ``recipe.yaml`` (resolved), ``ds_config.json``,
``metrics.jsonl``, ``tb/``, ``checkpoints/`` (with ``latest``), ``run.json`` (status) and, for the
tiny preset without ``--data``, ``data/`` (a synthetic corpus prepared on the fly). Running the
same command on the same ``--out`` resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from fpm.cpu import allocator
from fpm.config import dump_recipe, load_recipe
from fpm.config.schema import Recipe
from fpm.console import info, warn
from fpm.data.shards import MANIFEST
from fpm.data.tiny import tiny_data
from fpm.engine.distributed import barrier, resolve_env
from fpm.errors import FpmError, one_line
from fpm.engine.precision import for_run as choose_precision
from fpm.engine.session import run_session, stop_signals
from fpm.engine.spec import pretraining_spec
from fpm.engine.trackers import Trackers, check_installed
from fpm.eval import downstream
from fpm.rundir import PEAK, RunDir

# recipe keys that may change between a run and its resumption (everything else must match)
RESUMABLE_CHANGES = {("train", "max_steps"), ("train", "save_every"), ("train", "log_every"),
                     ("train", "eval_every"), ("train", "eval_batches"),  # evaluation draws no random numbers
                     ("train", "keep_last"), ("train", "max_nonfinite_steps"), ("train", "peak_tflops"),
                     ("data", "path"), ("deepspeed",), ("train", "micro_batch"), ("train", "grad_accum"),  # reshard
                     ("data", "num_workers"), ("description",), ("cluster",)}


def default_out(recipe: Recipe, preset: str | None) -> Path:
    return Path("runs") / (recipe.name + (f"-{preset}" if preset else ""))


def _diff(a, b, path=()) -> list[str]:
    if path in RESUMABLE_CHANGES or path[:1] in RESUMABLE_CHANGES:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), (*path, k))
        return out
    return [] if a == b else [f"{'.'.join(path)}: {a!r} -> {b!r}"]


def check_run_dir(out: Path, recipe: Recipe, resume: str) -> None:
    rd = RunDir(out)
    saved = rd.recipe
    has_ckpt = rd.checkpoints.is_dir() and any(rd.checkpoints.iterdir())
    if resume == "never" and has_ckpt:
        raise FpmError(f"{out} already holds checkpoints and --resume never was given; choose another --out")
    if saved.is_file() and has_ckpt:
        old = yaml.safe_load(saved.read_text())
        changes = _diff(old, recipe.model_dump(mode="json"))
        if changes:
            raise FpmError(f"{out} holds a run of a different recipe ({'; '.join(changes[:3])}); use another --out")


def validation_for(recipe: Recipe, spec, sources: list[tuple[Path, float]], dist):
    """The validation set of the run (``train.eval_every``): the sources' validation parts, mixed
    as in training; None — with a warning — when a prepared folder has no validation part."""
    if not spec.eval_every:
        return None
    from fpm.data.mixture import build_mixture
    from fpm.engine.validation import Validation

    try:
        part = build_mixture(recipe, sources, part="validation")
    except FpmError as exc:
        if "no validation part" not in str(exc):
            raise
        if dist.rank == 0:
            warn(f"train.eval_every={spec.eval_every} but {exc}: training without validation")
        return None
    return Validation(part, spec.global_batch, spec.micro_batch, spec.eval_batches, dist)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"


def pretrain(recipe_name: str, *, preset: str | None = None, overrides: list[str] | None = None,
             data: Path | str | list | None = None, out: Path | None = None, max_steps: int | None = None,
             save_every: int | None = None, seed: int | None = None, resume: str = "auto",
             memory_check: bool = True, trackers: list[str] | None = None) -> int:
    """Returns the process exit code (see :mod:`fpm.engine.signals`)."""
    flags = {"train.max_steps": ("--max-steps", max_steps), "train.save_every": ("--save-every", save_every),
             "train.seed": ("--seed", seed)}
    with stop_signals():
        return _pretrain(recipe_name, preset, list(overrides or []), flags, data, out, resume, memory_check,
                         list(trackers or []))


def _pretrain(recipe_name: str, preset: str | None, sets: list[str], flags: dict, data, out: Path | None,
              resume: str, memory_check: bool = True, trackers: list[str] | None = None) -> int:
    check_installed(trackers or [])
    recipe = load_recipe(recipe_name, preset=preset, overrides=sets, flags=flags, kind="pretrain")
    if resume not in ("auto", "never"):
        raise FpmError(f"--resume must be auto or never, not {resume!r}")
    out = Path(out) if out else default_out(recipe, preset)
    dist = resolve_env()
    recipe, precision = choose_precision(recipe, out, dist)
    downstream.check(recipe)
    memory = check_memory(recipe, dist) if memory_check else None
    with run_session(out, "fpm pretrain " + recipe_name, dist, recipe.train.collective_timeout_s):
        return _run(recipe, dist, out, data, resume, memory, precision, trackers or [])


def data_sources(data, recipe: Recipe) -> list[tuple[Path, float]]:
    """``--data`` (one or more ``DIR[:WEIGHT]``), else the recipe's ``data.path``; [] for none."""
    from fpm.data.mixture import parse_source

    given = data if data else recipe.data.path
    if not given:
        return []
    items = [given] if isinstance(given, (str, Path)) else list(given)
    return [parse_source(str(x)) for x in items]


def check_memory(recipe: Recipe, dist):
    """The launch check (:func:`fpm.engine.memory.launch_check`), before anything is built."""
    from fpm.config.schema import derive_batch
    from fpm.engine.distributed import select_accelerator
    from fpm.engine.memory import launch_check

    t = recipe.train
    try:
        _, micro, _ = derive_batch(t.global_batch, t.micro_batch, t.grad_accum, dist.world_size)
    except ValueError:
        return None  # the trainer's set-up reports the batch error
    return launch_check(recipe, dist.world_size, dist.local_world_size, micro, select_accelerator())


def host_peak_gb(dist, device) -> dict:
    """The largest resident set of any rank, and the sum over all ranks (one machine: its total)."""
    import resource

    import torch

    from fpm.engine.distributed import all_max, all_sum

    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"max_rank": all_max(mine, dist.world_size, device),
            "sum_ranks": float(all_sum(torch.tensor(mine, device=device), dist.world_size))}


def _run(recipe: Recipe, dist, out: Path, data, resume: str, memory=None, precision=None,
         trackers: list[str] | None = None) -> int:
    import torch

    from fpm.data.mixture import build_mixture
    from fpm.engine.flops import train_flops_per_token
    from fpm.engine.peak import resolve as resolve_peak
    from fpm.engine.trainer import Trainer
    from fpm.models import pretraining_objective

    rank0 = dist.rank == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        check_run_dir(out, recipe, resume)
    barrier()
    sources = data_sources(data, recipe)
    if not sources:
        if not recipe.tokenizer.train:
            raise FpmError("no data: prepare shards with `fpm data prepare` and pass --data DIR "
                           "(only the tiny preset makes a corpus of its own)")
        if rank0:
            tiny_data(recipe, out)
        barrier()
        sources = [(out / "data", 1.0)]
    data_dir = sources[0][0]  # the vocabulary (and, with one source, the data) the run adopts
    dataset = build_mixture(recipe, sources)
    sp = dataset.tok.specials
    rd = RunDir(out)
    if rank0:  # from here on the run directory holds everything its model needs to be used
        rd.recipe.write_text(dump_recipe(recipe))
        manifest = dataset.shards.manifest
        rd.adopt_data(data_dir, MANIFEST, manifest["tokenizer"]["dir"])
        rd.write_status(recipe=recipe.name, status="running", exit_code=None, reason=None, step=None,
                        max_steps=recipe.train.max_steps, world_size=dist.world_size, data=str(data_dir.resolve()),
                        data_sources=[{"path": str(p.resolve()), "weight": w} for p, w in sources],
                        started=time.time(), torch=torch.__version__, python=platform.python_version(),
                        host=platform.node(), device=_device_name(), slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                        train_precision=precision.as_dict() if precision else None)
    seq = recipe.data.seq_len
    target = getattr(dataset, "target_len", None)
    spec = pretraining_spec(recipe, dist.world_size,
                            train_flops_per_token(recipe.model, recipe.tokenizer.vocab_size, seq, target))
    peak = resolve_peak(spec.precision, given=spec.peak_tflops, cache=rd / PEAK)
    scored = downstream.enabled(recipe)  # chosen checkpoints fine-tuned and scored beside the training
    track = Trackers(trackers or [], out, out.name, recipe.model_dump(mode="json"), enabled=rank0)
    trainer = Trainer(spec, lambda: pretraining_objective(recipe, sp), out, dist, peak_tflops=peak.tflops,
                      resume=resume == "auto", on_sealed=downstream.Launcher(out, recipe) if scored and rank0 else None,
                      trackers=track)
    validation = validation_for(recipe, spec, sources, dist)
    if rank0:  # the trainer writes ds_config.json when it builds the engine
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
        info(f"{recipe.name}: {n_params:,} parameters, {dist.world_size} "
             f"process(es) ({dist.backend}), global batch {spec.global_batch} = {spec.micro_batch} x "
             f"{spec.grad_accum} x {dist.world_size}, {recipe.train.precision}, ZeRO {spec.deepspeed.zero_stage}, "
             f"{torch.get_num_threads()} threads, {allocator.in_use()} malloc, MFU against {peak.tflops:,.1f} "
             f"TFLOP/s ({peak.source}: {peak.detail}); run dir {out}")
    watch = downstream.Watch(out, dist.rank, track) if scored else None  # failures said, scores to the trackers
    t0 = time.time()
    try:
        result = trainer.fit(dataset, validation=validation, on_step=watch, on_step_every=spec.log_every)
    except BaseException as exc:
        if rank0:
            with contextlib.suppress(OSError):  # a full disk may refuse this too
                rd.write_status(status="failed", error=one_line(exc)[:500], wall_s=time.time() - t0)
            track.summary(rd.status())
            track.close()
        raise
    used = host_peak_gb(dist, trainer.engine.device)
    if rank0:
        rd.write_status(status=result.reason, exit_code=result.exit_code, reason=result.reason, step=result.step,
                        max_steps=spec.max_steps, wall_s=time.time() - t0, threads=torch.get_num_threads(),
                        allocator=allocator.in_use(), peak=peak.as_dict(), validation=result.validation,
                        spikes=result.spikes, source_shares=result.sources, speed_ups=trainer.speed_ups,
                        memory={"estimate": asdict(memory) if memory else None, "host_peak_gb": used})
        if result.reason == "done":
            info(f"done: step {result.step}; checkpoints in {rd.checkpoints}")
        if scored:
            watch(result.step)
            downstream.say_summary(out)
        track.summary(rd.status())
        track.close()
    return result.exit_code
