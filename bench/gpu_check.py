"""One command that checks fpm where its users run it: one NVIDIA GPU (``--cpu``: the same logic at
tiny shapes on the CPU, as the test suite runs it so that this script cannot rot).

    python bench/gpu_check.py [--cpu] [--out gpu_check.json] [--budget-s 330] [--work DIR]

Stages, in this order, each in a fresh process with a time budget of its own:

1. ``env``         versions (Python, torch, CUDA, transformers, DeepSpeed), the device, fpm's commit, and
                   the speed calibration: a fixed matmul workload (fp32 on the CPU with ``--cpu``, bf16 on
                   the GPU) against the machine the default budgets were set on; every later budget is
                   multiplied by that ratio (never below 1, at most 10)
2. ``sdpa``        which scaled-dot-product-attention kernel BERT's padded (masked) attention and
                   GPT's causal attention take (the aten op seen by the profiler)
3. ``equivalence`` engine layouts against one-process ZeRO-0 references (:mod:`fpm.engine.layouts`): GPT at
                   ZeRO 0-3 x accumulation 1/4 in fp32, bf16 and fp16, and BERT at ZeRO-0/3 x accumulation
                   4; loss and weight agreement per layout. One worker process trains the layouts one
                   after the other, each layout with a deadline of its own: a layout past it is killed
                   and recorded as a timeout, and a fresh worker goes on with the next one
4. ``nccl``        two processes over NCCL (torchrun) against the same references, ZeRO-0 and ZeRO-3;
                   "n/a: needs 2 GPUs" where fewer are visible (not a failure)
5. ``resume``      ``fpm pretrain`` (tiny BERT) killed with SIGKILL after a checkpoint and resumed,
                   against an uninterrupted run (and a second uninterrupted run: run-to-run noise)
6. ``export``      ``fpm export`` of that run; logits of plain ``transformers`` vs fpm's own model
7. ``finetune``    ``fpm finetune qqp`` briefly on a synthetic task, evaluating on the device; the
                   classifier's step padded against padding-free (whether fpm should train padding-free
                   on that device)
8. ``throughput``  ``fpm pretrain`` at a BERT-E shape (12 x 1024, seq 128) and a CPM-X shape
                   (8 x 2560, seq 512) in bf16 and fp16 (with ``--cpu``: the precision ``auto`` picks
                   on that CPU) with activation checkpointing: tokens/s, MFU
                   against a matmul peak measured here, the memory peak (``torch.cuda.max_memory_allocated``;
                   with ``--cpu`` the host's peak RSS) against the launch check's estimate (``fpm plan``'s
                   accounting); and ``transformers.Trainer`` on the same shapes in the same run (the ratio)

Every stage is made of cells (a layout, a run, a comparison); each cell is recorded in the JSON and
printed as soon as it finishes, so a kill loses only the cell in flight. A cell is ``pass``,
``fail`` (it ran; its check did not hold), ``error``, ``timeout`` (killed at its budget),
``skipped`` (out of time, or what it needs did not finish) or ``n/a`` (this machine lacks the
hardware). A stage is its worst cell. The exit status is 0 only when every stage that ran passed and
none was skipped for lack of time; ``n/a`` counts neither way. The last line of the output counts
them. ``--budget-s`` caps the whole run: a stage's budget is its scaled default or what is left,
whichever is less, and a stage with under 5 s left is ``skipped: out of time``.

The scratch folder (``--work``, by default a fresh temporary folder) is never inside this checkout.

Missing packages: the GPU machine may have only torch and another transformers. fpm runs from this
checkout (``PYTHONPATH``); DeepSpeed, pydantic, typer/rich and accelerate travel as wheels made by
``bench/gpu_wheels.sh`` into ``bench/wheels/`` and are installed from there (no index) into
``bench/.gpu_deps/`` when they do not import. See bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "bench" / "wheels"
DEPS = ROOT / "bench" / ".gpu_deps"
# what fpm's training path imports beyond torch and transformers, by distribution name
NEEDED = ["deepspeed", "hjson", "py-cpuinfo", "einops", "msgpack", "ninja", "psutil", "pydantic",
          "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "typer", "click", "rich",
          "shellingham", "markdown-it-py", "mdurl", "pygments", "accelerate"]
PROBE_IMPORTS = ["deepspeed", "pydantic", "typer", "rich", "accelerate"]
# English recipes: their vocabularies need no jieba (one package fewer to carry)
RECIPES = {"bert": "bert-e-l", "gpt": "epm-x-s"}

STAGE_ORDER = ["env", "sdpa", "equivalence", "nccl", "resume", "export", "finetune", "throughput"]
# stages of the self-test (tests/test_gpu_check.py): only when --only names them
SELF_TEST = ["selftest", "selfhang", "selfskip"]

# Default budgets in seconds, (--cpu, GPU), at the calibration's reference speed; each is multiplied
# by the measured scale. Stages, then the kinds of cell inside them. --cpu: 2-4 times what each took
# on the development machine (2 cores, x86-64 with AVX-512) shared with other jobs, where the whole
# check took 8-15 minutes as the load varied (40-80 GFLOP/s calibrated; 4 minutes unloaded). GPU:
# guesses for one H200 until a run on a GPU measures them (bench/RESULTS.md). They bound a stuck cell
# or stage; the overall --budget-s caps them all.
BUDGETS: dict[str, tuple[float, float]] = {
    "env": (120, 240),  # not scaled: the calibration runs in it
    "sdpa": (240, 180),
    "equivalence": (300, 420),
    "nccl": (300, 300),  # --cpu: only with the hidden --two-procs-on-cpu (gloo)
    "resume": (500, 300),
    "export": (150, 120),
    "finetune": (300, 180),
    "throughput": (800, 360),
    "selftest": (60, 60),
    "selfhang": (3600, 3600),
    "selfskip": (60, 60),
    # cells
    "prepare": (120, 120),  # preparing one family's synthetic data
    "sdpa_cell": (150, 150),  # one family's profiled step (its data prepared first)
    "layout": (60, 60),  # one engine layout, after the first in its process
    "layout_startup": (90, 240),  # added to a process's first layout: imports, DeepSpeed's set-up, JIT builds
    "pretrain": (150, 120),  # one tiny `fpm pretrain`
    "resume_kill": (240, 240),  # a tiny `fpm pretrain` killed after its second checkpoint, and resumed
    "finetune_run": (200, 150),  # `fpm finetune` for 20 steps with two evaluations
    "cell": (120, 120),  # export, comparisons
    "speed": (240, 240),  # one throughput run (fpm or transformers.Trainer)
    "selftest_cell": (1, 1),
}
MIN_STAGE_S = 5.0  # less than this left overall: the stage is skipped (out of time)
ALARM_SLACK_S = 2.0  # a cell's work in its stage's own process is interrupted this long after its budget
GRACE_S = 3.0  # past a stage's budget, its worker gets this long to record its cells before it is killed
MAX_SCALE = 10.0
# the calibration workload on the machine the defaults were set on (see calibrate())
REF_CPU_GFLOPS = 40.0  # fp32 1024^2 matmuls, all threads: the development machine above, shared
REF_GPU_TFLOPS = 600.0  # bf16 8192^2 matmuls on one H200 (about 75% of its dense peak)

FAILED, SKIPPED, PASSED, NA = ("error", "timeout", "fail"), ("skipped",), ("pass",), ("n/a",)
SEVERITY = ["error", "timeout", "fail", "skipped", "pass", "n/a"]  # a stage is its worst cell


# ------------------------------------------------------------------ environment


def bootstrap() -> dict:
    """Make fpm and its dependencies importable here and in every child process; returns what was done."""
    done = {"fpm": f"from source: {ROOT}"}
    missing = [m for m in PROBE_IMPORTS if importlib.util.find_spec(m) is None]
    if missing and WHEELS.is_dir():
        DEPS.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(WHEELS),
               "--no-deps", "--upgrade", "--target", str(DEPS), *NEEDED]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        done["wheels"] = f"installed {len(NEEDED)} packages from {WHEELS} into {DEPS}" if proc.returncode == 0 else \
            f"pip failed: {proc.stderr.strip()[-400:]}"
    # the carried packages only where the machine lacks them: a second DeepSpeed on the path would
    # also rebuild its JIT ops (their build files name the source path)
    paths = [str(ROOT)] + ([str(DEPS)] if missing and DEPS.is_dir() else [])
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if missing:  # whether the carried ones import, in one fresh process (the env stage imports them all anyway)
        code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    try: importlib.import_module(m)\n"
                "    except Exception: print(m)")
        proc = subprocess.run([sys.executable, "-c", code, *PROBE_IMPORTS], capture_output=True, text=True,
                              env=os.environ)
        still = proc.stdout.split() if proc.returncode == 0 else PROBE_IMPORTS
        if still:
            done["missing"] = still
    return done


def child_env(extra: dict | None = None) -> dict:
    """The environment for child processes: no inherited rendezvous of any launcher around us."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


# ------------------------------------------------------------------ processes with deadlines


class Timeout(BaseException):
    """A cell or stage ran past its budget and was killed (a BaseException: no ``except Exception``
    in the libraries a cell calls swallows it)."""


def _alarm(signum, frame):  # noqa: ARG001
    raise Timeout("ran past its budget and was interrupted")


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_gb: float  # the peak resident memory of the process (and of the children it waited for)


_ACTIVE: set[int] = set()  # process groups started here and still running: killed if we are
_GENTLE = {"on_term": True}  # the driver asks its stage workers to stop their cells; a worker just kills them


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _on_term(signum, frame):  # noqa: ARG001 - stopped ourselves: take what we started along
    """In the driver: SIGTERM to every process group started here (a stage's worker then kills its
    cells), SIGKILL to whatever is left 3 s later; in a stage's worker: SIGKILL at once. Then exit."""
    for pid in list(_ACTIVE):
        _kill_group(pid, signal.SIGTERM if _GENTLE["on_term"] else signal.SIGKILL)
    t = time.time()
    while _GENTLE["on_term"] and _ACTIVE and time.time() - t < 3.0:
        for pid in list(_ACTIVE):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    _ACTIVE.discard(pid)
            except ChildProcessError:
                _ACTIVE.discard(pid)
        time.sleep(0.05)
    for pid in list(_ACTIVE):
        _kill_group(pid)
    os._exit(128 + signum)


def start(cmd: list[str], log: Path, env: dict | None = None, passthrough: bool = False) -> subprocess.Popen:
    """Start ``cmd`` in a process group of its own (a timeout kills everything it started); stdout
    goes to ``log`` with the suffix ``.out`` (or through to ours), stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull if passthrough else log.with_suffix(".out"), "w") as out, open(log, "w") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=None if passthrough else out, stderr=err, env=env or child_env(),
                                start_new_session=True)
    _ACTIVE.add(proc.pid)
    return proc


def stop(proc: subprocess.Popen, gentle: bool = False) -> None:
    """Kill ``proc``'s process group (``gentle``: SIGTERM first, SIGKILL 3 s later) and reap it; a
    cell's alarm waits until this is done."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        if proc.poll() is None and gentle:
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc.pid)
        if proc.returncode is None:
            proc.wait()
        _ACTIVE.discard(proc.pid)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def run(cmd: list[str], log: Path, until: float, env: dict | None = None, check: bool = True,
        passthrough: bool = False, gentle: bool = False) -> Done:
    """Run ``cmd`` to its end or until the absolute time ``until`` (then kill its group: :class:`Timeout`)."""
    t0 = time.time()
    proc = start(cmd, log, env, passthrough)
    status, rusage, delay = None, None, 0.01
    try:
        while True:
            pid, wstatus, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, rusage = os.waitstatus_to_exitcode(wstatus), ru
                proc.returncode = status
                break
            if time.time() >= until:
                break
            time.sleep(delay)
            delay = min(0.2, 2 * delay)
    finally:
        stop(proc, gentle=gentle and status is None)  # also whatever it left running in its group
    if status is None:
        raise Timeout(f"ran past its budget of {until - t0:.0f} s and was killed: {_short(cmd)}")
    stdout = "" if passthrough else log.with_suffix(".out").read_text(errors="replace")
    stderr = log.read_text(errors="replace")
    done = Done(status, stdout, stderr, time.time() - t0, rusage.ru_maxrss * 1024 / 1e9)  # ru_maxrss: KiB (Linux)
    if check and status != 0:
        raise RuntimeError(f"exit {status}: {_short(cmd)}; {stderr.strip()[-600:]} (log: {log})")
    return done


def _short(cmd: list[str]) -> str:
    return " ".join(Path(c).name if os.sep in c else c for c in cmd[:6]) + (" ..." if len(cmd) > 6 else "")


def fpm(*args: str, log: Path, until: float) -> Done:
    return run([sys.executable, "-m", "fpm", *args], log, until)


# ------------------------------------------------------------------ results, stages, cells


class Store:
    """The JSON file (``--out``), rewritten whole (atomically) each time a cell or stage finishes."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        return json.loads(self.path.read_text())

    def save(self, data: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self.path)

    def update_stage(self, name: str, **fields) -> dict:
        data = self.load()
        stage = data["stages"].setdefault(name, {})
        stage.update(fields)
        self.save(data)
        return stage


class Context:
    """What every stage's worker knows: the mode, the work folder, the scale, the budgets."""

    def __init__(self, state: dict):
        self.state = state
        self.cpu = state["cpu"]
        self.work = Path(state["work"])
        self.scale = state["scale"]
        self.overrides = state.get("overrides", {})
        self.two_procs_on_cpu = state.get("two_procs_on_cpu", False)
        self.precision = "fp32" if self.cpu else self._auto_precision()

    @staticmethod
    def _auto_precision_cpu() -> str:
        from fpm.engine.precision import choose, detect

        return choose("auto", detect("cpu")).precision

    @staticmethod
    def _auto_precision() -> str:
        """What `train.precision: auto` picks on this GPU (bf16 from compute capability 8.0, else fp16)."""
        from fpm.engine.precision import choose, detect

        return choose("auto", detect("cuda")).precision

    def default(self, key: str) -> float:
        """The budget of a stage or kind of cell: the override, else the mode's default times the scale."""
        if key in self.overrides:
            return float(self.overrides[key])
        return BUDGETS[key][0 if self.cpu else 1] * (1.0 if key == "env" else self.scale)

    @cached_property
    def device(self):
        import torch

        if not self.cpu and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run with --cpu for the CPU variant")
        return torch.device("cpu" if self.cpu else "cuda")

    @cached_property
    def device_name(self) -> str:
        import torch

        return "cpu" if self.cpu else torch.cuda.get_device_name()

    @cached_property
    def gpu_memory_gb(self) -> float:
        import torch

        return 0.0 if self.cpu else torch.cuda.get_device_properties(0).total_memory / 1e9


class Stage:
    """One stage in its worker process: runs cells, records each as it finishes."""

    def __init__(self, ctx: Context, name: str, deadline: float, store: Store):
        self.ctx, self.name, self.deadline, self.store = ctx, name, deadline, store
        self.cells: dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.time()

    def budget(self, key: str) -> float:
        return max(0.0, min(self.ctx.default(key), self.left()))

    def cell(self, key: str, fn, budget: str = "cell", needs: tuple[str, ...] = ()) -> dict:
        """Run ``fn(until)`` (``until``: the absolute time its budget ends) as cell ``key``; its dict
        (``"ok": False`` makes it a ``fail``) is recorded with status, seconds and budget. The
        processes it starts are killed at ``until``; its own work here is interrupted by an alarm
        ALARM_SLACK_S later."""
        for n in needs:
            status = self.cells.get(n, {}).get("status", "missing")
            if status != "pass":
                return self.record(key, {"status": "skipped", "reason": f"needs {n}, which is {status}"})
        b = self.budget(budget)
        if b < 1.0:
            return self.record(key, {"status": "skipped", "reason": "out of time", "budget_s": round(b, 1)})
        t = time.time()
        signal.signal(signal.SIGALRM, _alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, b + ALARM_SLACK_S)
            try:
                value = dict(fn(t + b) or {})
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            value["status"] = "pass" if value.get("ok", True) else "fail"
        except Timeout as e:
            value = {"status": "timeout", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a cell's error is its result; the next cell goes on
            value = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:3000]}
        value.update(seconds=round(time.time() - t, 2), budget_s=round(b, 1))
        return self.record(key, value)

    def record(self, key: str, value: dict) -> dict:
        self.cells[key] = value
        self.store.update_stage(self.name, cells=self.cells)
        print(f"  {self.name}/{key}: {cell_text(self.name, key, value)}", flush=True)
        return value

    def set(self, **fields) -> None:
        self.store.update_stage(self.name, **fields)

    def other(self, stage: str, cell: str) -> dict:
        """A cell of an earlier stage, as recorded."""
        return self.store.load()["stages"].get(stage, {}).get("cells", {}).get(cell, {})


def worst(statuses) -> str:
    """The most severe status; ``n/a`` only when nothing else is there; ``pass`` for nothing at all."""
    statuses = [s if s in SEVERITY else "error" for s in statuses]
    counted = [s for s in statuses if s not in NA]
    if not counted:
        return "n/a" if statuses else "pass"
    return min(counted, key=SEVERITY.index)


# ------------------------------------------------------------------ env and calibration


def calibrate(cpu: bool) -> dict:
    """A fixed matmul workload on the device the check trains on, against the machine the default
    budgets were set on: the scale every later budget is multiplied by (1 to MAX_SCALE)."""
    import torch

    if cpu:
        n, reps, dtype, device, ref, unit = 1024, 8, torch.float32, "cpu", REF_CPU_GFLOPS, 1e9
    else:
        n, reps, dtype, device, ref, unit = 8192, 20, torch.bfloat16, "cuda", REF_GPU_TFLOPS, 1e12
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    rate = 2 * n ** 3 * reps / best / unit
    scale = min(MAX_SCALE, max(1.0, ref / rate))
    return {"workload": f"{reps} {'fp32' if cpu else 'bf16'} {n}x{n} matmuls on the {device}, best of 3",
            "measured": round(rate, 2), "reference": ref, "unit": "GFLOP/s" if cpu else "TFLOP/s",
            "threads": torch.get_num_threads(), "scale": round(scale, 3)}


def env_stage(st: Stage) -> None:
    def versions(until):
        import torch

        ctx = st.ctx
        out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
               "cuda_available": torch.cuda.is_available(), "cuda_device_count": torch.cuda.device_count(),
               "mode": "cpu" if ctx.cpu else "gpu", "bootstrap": ctx.state.get("bootstrap")}
        if not ctx.cpu and not torch.cuda.is_available():
            return {**out, "ok": False, "device": "no CUDA device"}
        out["device"] = ctx.device_name
        for name in ("transformers", "deepspeed", "accelerate", "pydantic"):
            try:
                out[name] = __import__(name).__version__
            except Exception as e:  # noqa: BLE001
                out[name] = f"missing ({type(e).__name__})"
        try:
            out["fpm_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip() or "unknown"
        except OSError:
            out["fpm_commit"] = "unknown"
        return out

    if st.cell("versions", versions)["status"] == "pass":
        st.cell("calibration", lambda until: calibrate(st.ctx.cpu))


# ------------------------------------------------------------------ attention kernels

SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_attention_math", "_scaled_dot_product_fused_attention_overrideable")


def sdpa_stage(st: Stage) -> None:
    """One training micro-step of each family's objective (forward and backward, the run's precision)
    under the profiler; the SDPA op that ran, or the matmul path fpm takes on a CPU."""

    def one(family: str, until: float) -> dict:
        import torch
        from torch.profiler import ProfilerActivity, profile

        from fpm.config import load_recipe
        from fpm.cpu.speed import speed_up
        from fpm.data.datasets import build_dataset
        from fpm.models import build_model, objective

        ctx = st.ctx
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ctx.precision]
        recipe = load_recipe(RECIPES[family], preset="tiny")
        dataset = build_dataset(recipe, prepare_data(ctx, family, until))
        model = build_model(recipe.model, recipe.tokenizer.vocab_size, seed=0).to(ctx.device, dtype).train()
        batch = torch.utils.data.default_collate([dataset[i] for i in range(8)])
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if not ctx.cpu else [])
        loss = objective(recipe.model, model)
        speed_up(loss, ctx.device)  # what the trainer applies
        with profile(activities=acts) as prof:
            loss(batch).backward()
        names = {e.key.replace("aten::", "") for e in prof.key_averages()}
        taken = [op for op in SDPA_OPS if op in names]
        return {"op": taken[0] if taken else "matmul + softmax (no SDPA op)"}

    for family, label in (("bert", "bert (padded, key mask)"), ("gpt", "gpt (causal)")):
        st.cell(label, lambda until, family=family: one(family, until), budget="sdpa_cell")


# ------------------------------------------------------------------ equivalence


def prepare_data(ctx: Context, family: str, until: float) -> Path:
    """A small prepared folder per family (synthetic corpus, trained vocabulary), made once."""
    folder = ctx.work / f"data-{family}"
    if not (folder / "manifest.json").is_file():
        code = ("import sys; from pathlib import Path; from fpm.config import load_recipe; "
                "from fpm.data.prepare import PrepareOptions, prepare; from fpm.data.synthetic import write_corpus; "
                f"r = load_recipe({RECIPES[family]!r}, preset='tiny'); "
                f"c = write_corpus(Path({str(ctx.work)!r}) / 'corpus-{family}.txt', r.language, 400); "
                f"prepare(r, PrepareOptions(inputs=[c], out=Path({str(folder)!r}), workers=0, quiet=True))")
        run([sys.executable, "-c", code], ctx.work / "logs" / f"prepare-{family}.log",
            min(until, time.time() + ctx.default("prepare")))
    return folder


TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (5e-3, 2e-2), "fp16": (5e-3, 2e-2)}  # (loss rel, weight rel)
LAYOUT_STEPS = 6


def equivalence_cells(ctx: Context) -> list[dict]:
    if ctx.cpu:  # DeepSpeed refuses fp16 on a CPU; tests/test_equivalence.py covers the CPU matrix
        grid = [("gpt", z, a, p) for z in (0, 3) for a in (1, 4) for p in ("fp32",)] + \
               [("gpt", z, 4, "bf16") for z in (0, 3)]
    else:
        grid = [("gpt", z, a, p) for p in ("fp32", "bf16", "fp16") for z in range(4) for a in (1, 4)]
        grid += [("bert", z, 4, p) for p in ("fp32", "bf16", "fp16") for z in (0, 3)]
    return [{"family": f, "zero": z, "accum": a, "procs": 1, "checkpointing": False, "precision": p}
            for f, z, a, p in grid]


def by_reference(layouts: list) -> list:
    """Each reference first, then the layouts compared with it: comparisons complete as early as they can."""
    groups: dict = {}
    for layout in layouts:
        groups.setdefault(layout.reference(), []).append(layout)
    ordered = []
    for ref, members in groups.items():
        ordered += [ref] if ref in members else []
        ordered += [m for m in members if m != ref]
    return ordered


def layout_done(st: Stage, layout, out: Path, seconds: float, budget: float) -> None:
    """Record a trained layout: a reference as trained, any other against its reference."""
    from fpm.engine.layouts import compare

    value = {"seconds": round(seconds, 2), "budget_s": round(budget, 1)}
    ref = layout.reference()
    if layout == ref:
        value.update(status="pass", role="reference")
    else:
        try:
            a = compare(out, layout)
            loss_tol, weight_tol = TOLERANCES[layout.precision]
            ok = a.loss_rel <= loss_tol and a.weight_rel <= weight_tol
            value.update(status="pass" if ok else "fail", reference=ref.name, loss_rel=a.loss_rel,
                         weight_rel=a.weight_rel, weight_abs=a.weight_abs)
        except Exception as e:  # noqa: BLE001
            value.update(status="error", reason=f"comparison: {type(e).__name__}: {e}"[:2000])
    st.record(layout.name, value)


def _complete_json(path: Path) -> bool:
    """``path`` exists and parses (it may be seen half-written)."""
    for _ in range(50):
        try:
            json.loads(path.read_text())
            return True
        except (OSError, ValueError):
            time.sleep(0.05)
    return False


def train_layouts(st: Stage, layouts: list, out: Path, data: dict, launcher: list[str], tag: str,
                  failed: set[str]) -> None:
    """Train ``layouts`` (in order) with ``launcher + [cells.json, out]`` (:mod:`fpm.engine.layouts`), one
    worker process for as many as it gets through: each layout has its own deadline (its budget, plus
    the start-up budget for a worker's first); a layout past it, or one its worker fails on, is
    recorded and a fresh worker goes on with the rest. A layout whose reference did not finish is
    skipped. ``failed`` collects the names that did not finish."""
    ctx = st.ctx
    pending = list(layouts)
    attempt = 0
    while pending:
        runnable = []
        for layout in pending:
            ref = layout.reference()
            if ref != layout and ref.name in failed:
                st.record(layout.name, {"status": "skipped", "reason": f"its reference {ref.name} did not finish"})
                failed.add(layout.name)
            else:
                runnable.append(layout)
        pending = runnable
        if not pending:
            break
        if st.left() < 1.0:
            for layout in pending:
                st.record(layout.name, {"status": "skipped", "reason": "out of time"})
                failed.add(layout.name)
            break
        spec = ctx.work / f"cells-{tag}-{attempt}.json"
        spec.write_text(json.dumps({"steps": LAYOUT_STEPS, "data": data, "recipes": RECIPES,
                                    "layouts": [asdict(x) for x in pending]}))
        log = ctx.work / "logs" / f"layouts-{tag}-{attempt}.log"
        proc = start(launcher + [str(spec), str(out)], log)
        attempt += 1
        t_cell = time.time()
        budget = st.budget("layout_startup") + st.budget("layout")

        def lost(name: str, status: str, reason: str) -> None:  # this layout's cell; a new worker takes the rest
            st.record(name, {"status": status, "seconds": round(time.time() - t_cell, 2),
                             "budget_s": round(budget, 1), "reason": reason})
            failed.add(name)
            pending.pop(0)

        try:
            while pending:
                cur = pending[0]
                until = min(t_cell + budget, st.deadline)
                result = out / f"{cur.name}.json"
                if result.is_file() and _complete_json(result):
                    layout_done(st, cur, out, time.time() - t_cell, budget)
                    pending.pop(0)
                    t_cell, budget = time.time(), st.budget("layout")
                    continue
                if proc.poll() is not None:
                    if result.is_file() and _complete_json(result):
                        continue
                    tail = log.read_text(errors="replace").strip()[-1500:]
                    lost(cur.name, "error", f"its worker exited {proc.returncode}: {tail} (log: {log})")
                    break
                if time.time() >= until:
                    stop(proc)
                    lost(cur.name, "timeout", f"ran past its budget of {until - t_cell:.0f} s and was killed")
                    break
                time.sleep(0.1)
        finally:
            stop(proc)


def equivalence_stage(st: Stage) -> None:
    from fpm.engine.layouts import Layout

    ctx = st.ctx
    layouts = by_reference([Layout(**c) for c in equivalence_cells(ctx)])
    data = {f: str(prepare_data(ctx, f, st.deadline)) for f in sorted({x.family for x in layouts})}
    st.set(steps=LAYOUT_STEPS, tolerances=TOLERANCES)
    out = _fresh(ctx.work / "layouts")  # a reused --work: no old result may pass for a new one
    train_layouts(st, layouts, out, data, [sys.executable, "-m", "fpm.engine.layouts"], "p1", set())


def nccl_not_applicable(cpu: bool, device_count: int | None, two_procs_on_cpu: bool = False) -> str | None:
    """Why the two-process stage cannot run on this machine (it then counts as n/a, not as a failure)."""
    if cpu:
        return None if two_procs_on_cpu else "needs 2 GPUs (--cpu; tests/test_equivalence.py runs 2 processes on gloo)"
    if device_count is not None and device_count < 2:
        return f"needs 2 GPUs ({device_count} visible)"
    return None


def nccl_stage(st: Stage) -> None:
    """Two processes (torchrun; NCCL on GPUs, gloo with the hidden --two-procs-on-cpu) against the
    one-process ZeRO-0 references the equivalence stage trained (trained here when missing)."""
    import torch

    from fpm.engine.layouts import Layout

    ctx = st.ctx
    reason = nccl_not_applicable(ctx.cpu, torch.cuda.device_count(), ctx.two_procs_on_cpu)
    if reason:
        st.set(reason=reason)
        st.record("two processes", {"status": "n/a", "reason": reason})
        return
    precisions = ("fp32",) if ctx.cpu else ("fp32", "bf16")
    grid = [("gpt", z, p) for p in precisions for z in (0, 3)] + ([] if ctx.cpu else [("bert", 3, "bf16")])
    layouts = [Layout(f, z, 2, 2, False, p) for f, z, p in grid]
    out = ctx.work / "layouts"
    data = {f: str(prepare_data(ctx, f, st.deadline)) for f in sorted({x.family for x in layouts})}
    st.set(steps=LAYOUT_STEPS, tolerances=TOLERANCES, backend="gloo" if ctx.cpu else "nccl")
    refs = list(dict.fromkeys(x.reference() for x in layouts))
    missing = [r for r in refs if st.other("equivalence", r.name).get("status") != "pass"]  # not from this run
    for x in missing + layouts:  # what an earlier run may have left
        for path in (out / f"{x.name}.json", out / f"{x.name}.pt"):
            path.unlink(missing_ok=True)
        _fresh(out / x.name)
    failed: set[str] = set()
    if missing:
        train_layouts(st, missing, out, data, [sys.executable, "-m", "fpm.engine.layouts"], "nccl-ref", failed)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "fpm.engine.layouts"]
    train_layouts(st, layouts, out, data, torchrun, "nccl", failed)


# ------------------------------------------------------------------ resume, export, fine-tuning


def _losses(run_dir: Path) -> dict[int, float]:
    from fpm.engine.metrics import read_metrics

    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def _fresh(folder: Path) -> Path:
    """An empty ``folder`` (a reused --work must not resume an old run)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return folder


def resume_stage(st: Stage) -> None:
    ctx = st.ctx
    data = prepare_data(ctx, "bert", st.deadline)
    steps, every = (12, 3) if ctx.cpu else (30, 10)
    args = ["pretrain", "bert-e-l", "--preset", "tiny", "--data", str(data), "--max-steps", str(steps),
            "--save-every", str(every), "--set", "train.log_every=1", "--set", f"train.precision={ctx.precision}"]
    full, again, killed = (_fresh(ctx.work / n) for n in ("resume-full", "resume-again", "resume-killed"))

    def uninterrupted(folder: Path, until: float) -> dict:
        fpm(*args, "--out", str(folder), log=ctx.work / "logs" / f"{folder.name}.log", until=until)
        losses = _losses(folder)
        return {"steps": len(losses), "last_loss": losses[max(losses)] if losses else None}

    def kill_and_resume(until: float) -> dict:
        log = ctx.work / "logs" / "resume-killed-first.log"
        proc = start([sys.executable, "-m", "fpm", *args, "--out", str(killed)], log)
        latest = killed / "checkpoints" / "latest"
        try:
            while not (latest.is_file() and latest.read_text().strip() >= f"step-{2 * every:08d}"):
                if proc.poll() is not None:
                    raise RuntimeError(f"the run to be killed ended before its second checkpoint (log: {log})")
                if time.time() > until:
                    raise Timeout("no second checkpoint before the cell's budget ran out (killed)")
                time.sleep(0.02)
        finally:
            stop(proc)  # SIGKILL
        done = fpm(*args, "--out", str(killed), log=ctx.work / "logs" / "resume-killed.log", until=until)
        text = done.stdout + done.stderr
        start_step = int(text.split("(step ")[1].split(")")[0]) if "(step " in text else None
        return {"resumed_from": start_step, "ok": start_step == 2 * every}

    st.cell("uninterrupted", lambda until: uninterrupted(full, until), budget="pretrain")
    st.cell("rerun", lambda until: uninterrupted(again, until), budget="pretrain")
    st.cell("killed and resumed", kill_and_resume, budget="resume_kill")

    def agreement(until: float) -> dict:
        a, b, k = _losses(full), _losses(again), _losses(killed)
        start_step = st.cells["killed and resumed"]["resumed_from"]
        after = [s for s in range(steps + 1) if s > start_step]
        resumed_diff = max(abs(a[s] - k[s]) for s in after)
        rerun_diff = max(abs(a[s] - b[s]) for s in range(1, steps + 1))
        return {"max_abs_loss_diff_resumed": resumed_diff, "max_abs_loss_diff_rerun": rerun_diff,
                "bit_identical": resumed_diff == 0.0, "reruns_bit_identical": rerun_diff == 0.0,
                "ok": resumed_diff <= rerun_diff}

    st.cell("agreement", agreement, needs=("uninterrupted", "rerun", "killed and resumed"))


EXPORT_CHECK = r"""
import json, sys, torch, transformers
assert "fpm" not in sys.modules
model = transformers.MegatronBertForPreTraining.from_pretrained(sys.argv[1]).to(sys.argv[2]).eval()
ids = torch.tensor(json.loads(sys.argv[3]), device=sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).prediction_logits.float().cpu(), sys.argv[4])
"""


def _needs_resume_run(st: Stage) -> Path:
    status = st.other("resume", "uninterrupted").get("status", "not run")
    if status != "pass":
        raise RuntimeError(f"needs the resume stage's uninterrupted run, which is {status}")
    return st.ctx.work / "resume-full"


def export_stage(st: Stage) -> None:
    def check(until: float) -> dict:
        import torch

        from fpm.runs import load_run_model

        ctx = st.ctx
        run_dir, hf = _needs_resume_run(st), _fresh(ctx.work / "export-hf")
        fpm("export", str(run_dir), "--out", str(hf), log=ctx.work / "logs" / "export.log", until=until)
        recipe, model, _, _ = load_run_model(run_dir)
        ids = torch.randint(10, recipe.tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model.to(ctx.device)(input_ids=ids.to(ctx.device)).prediction_logits.float().cpu()
        script = ctx.work / "export_check.py"
        script.write_text(EXPORT_CHECK)
        env = child_env({"PYTHONPATH": ""})  # plain transformers: no fpm, nothing carried
        run([sys.executable, str(script), str(hf), str(ctx.device), json.dumps(ids.tolist()),
             str(ctx.work / "l.pt")], ctx.work / "logs" / "export-check.log", until, env=env)
        theirs = torch.load(ctx.work / "l.pt")
        diff = float((ours - theirs).abs().max())
        return {"max_abs_logit_diff": diff, "ok": diff <= 1e-4}

    st.cell("export", check)


def finetune_stage(st: Stage) -> None:
    ctx = st.ctx
    out = ctx.work / "finetune"

    def finetune(until: float) -> dict:
        from fpm.data.synthetic import write_qqp

        init = _needs_resume_run(st)
        task = write_qqp(ctx.work / "qqp", n_train=400, n_dev=100, n_test=50)
        fpm("finetune", "qqp", "--init", str(init), "--data-dir", str(task), "--preset", "tiny",
            "--out", str(_fresh(out)), "--max-steps", "20", "--no-floors", "--set", "train.eval_every=10",
            log=ctx.work / "logs" / "finetune.log", until=until)
        res = json.loads((out / "results.json").read_text())
        return {"dev_accuracy": res["accuracy"], "device": res.get("device"), "n_dev": res["n_examples"],
                "ok": str(res.get("device", "")).startswith(ctx.device.type)}

    st.cell("finetune", finetune, budget="finetune_run")
    st.cell("padding-free logits", lambda until: padding_free_logit_diff(ctx, out / "best", ctx.work / "qqp"),
            needs=("finetune",))
    # fpm trains padding-free on a CPU only until this shows it faster on a GPU (fpm.cpu.speed.padding_free_here)
    st.cell("padding-free vs padded step", lambda until: padding_free_step_times(ctx, out / "best", ctx.work / "qqp"),
            needs=("finetune",))


def padding_free_logit_diff(ctx: Context, model_dir: Path, task: Path) -> dict:
    """The fine-tuned classifier's logits on dev, padding-free (what fine-tuning trains with) against
    the padded model, fp32 on the device: the largest difference."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from fpm.classifier import load_init
    from fpm.config import load_recipe
    from fpm.cpu import bert_unpadded
    from fpm.data.pairs import trim
    from fpm.data.tasks import load_split
    from fpm.models.bert import use_sdpa

    recipe = load_recipe("qqp", preset="tiny", kind="finetune")
    encoder = load_init(model_dir, recipe).encoder
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(ctx.device, torch.float32).eval()
    use_sdpa(model)
    rows = encoder.encode(load_split(recipe.task, task, "dev").examples[:64])
    batch = {k: v.to(ctx.device) for k, v in trim({k: torch.as_tensor(v) for k, v in rows.items()}).items()}
    with torch.no_grad():
        padded = model(**batch).logits
        free = bert_unpadded.classification_logits(model, batch)
    diff = float((padded - free).abs().max())
    return {"max_abs_logit_diff": diff, "ok": diff <= 1e-4}


def padding_free_step_times(ctx: Context, model_dir: Path, task: Path, reps: int = 10) -> dict:
    """Forward + backward of the fine-tuned classifier on 64 dev rows, padded (the stock model)
    against padding-free, in the run's precision on the device: milliseconds each (informational:
    whether fpm should train padding-free on this device)."""
    import time as _time

    import torch
    from transformers import AutoModelForSequenceClassification

    from fpm.classifier import load_init
    from fpm.config import load_recipe
    from fpm.cpu import bert_unpadded
    from fpm.data.pairs import trim
    from fpm.data.tasks import load_split
    from fpm.models.bert import use_sdpa
    from fpm.models.classification import classification_loss

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ctx.precision]
    recipe = load_recipe("qqp", preset="tiny", kind="finetune")
    rows = load_init(model_dir, recipe).encoder.encode(load_split(recipe.task, task, "dev").examples[:64])
    batch = {k: v.to(ctx.device) for k, v in trim({k: torch.as_tensor(v) for k, v in rows.items()}).items()}
    batch["labels"] = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long, device=ctx.device)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(ctx.device, dtype).train()
    use_sdpa(model)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    times = {}
    for name, loss in (("padded", classification_loss), ("padding_free", bert_unpadded.classification_loss)):
        for i in range(reps + 2):  # two warm-up passes
            if i == 2:
                sync()
                t0 = _time.perf_counter()
            loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
        sync()
        times[f"{name}_ms"] = 1000 * (_time.perf_counter() - t0) / reps
    return {**{k: round(v, 2) for k, v in times.items()},
            "padding_free_speedup": round(times["padded_ms"] / times["padding_free_ms"], 3), "ok": True}


# ------------------------------------------------------------------ throughput


def shapes(ctx: Context) -> dict:
    """(recipe, overrides, micro batch, steps) per family; the paper's shapes on a GPU, tiny on a CPU."""
    if ctx.cpu:
        return {"bert": ("bert-e-l", [], 16, 12), "gpt": ("epm-x-s", [], 16, 12)}
    bert = ["model.n_layers=12", "model.d_model=1024", "model.n_heads=16", "model.d_head=64", "model.d_ff=4096",
            "model.max_positions=512", "data.seq_len=128", "tokenizer.vocab_size=30522"]
    gpt = ["model.n_layers=8", "model.d_model=2560", "model.n_heads=32", "model.d_head=80", "model.d_ff=10240",
           "model.max_positions=1024", "data.seq_len=512", "tokenizer.vocab_size=50257"]
    return {"bert": ("bert-e-l", bert, 32, 40), "gpt": ("epm-x-s", gpt, 8, 30)}


def measured_peak(ctx: Context, precision: str) -> float:
    import torch

    from fpm.engine.peak import measure_tflops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measure_tflops(dtype, ctx.device, seconds=1.0, n=2048 if ctx.cpu else 8192)


def memory_estimate(ctx: Context, recipe_name: str, overrides: list[str], micro: int) -> dict:
    """The memory the launch check expects the run to need, one process: ``fpm.engine.memory.estimate``
    (what ``fpm pretrain`` checks before it builds anything: on a GPU model states, buckets,
    activations and a fixed reserve for the CUDA context; on a CPU host memory, a fixed cost per
    process included); in a checkout without it, ``fpm plan``'s option for the run's ZeRO stage plus
    its reserve (the same GPU accounting)."""
    from fpm.config import load_recipe

    recipe = load_recipe(recipe_name, preset="tiny", overrides=overrides)
    try:
        from fpm.engine.memory import estimate
    except ImportError:
        estimate = None
    if estimate is not None:
        est = estimate(recipe, 1, 1, micro, "cpu" if ctx.cpu else "cuda", available=0.0)
        return {"estimate_gb": est.need_gb, "estimate_terms_gb": est.terms,
                "estimate_source": "fpm.engine.memory.estimate (the launch check)"}
    from fpm.commands.plan import plan
    from fpm.engine.memory import RESERVE_GB

    memory = ctx.gpu_memory_gb or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    p = plan(recipe, nodes=1, gpus_per_node=1, gpu_memory_gb=memory, micro_batch=micro)
    o = next(o for o in p.options if o.stage == recipe.deepspeed.zero_stage and o.offload == "none")
    terms = {"model states": round(o.states_gb, 3), "buckets": round(o.buckets_gb, 3),
             "activations": round(micro * o.act_per_sample_gb, 3), "reserve": RESERVE_GB}
    return {"estimate_gb": sum(terms.values()), "estimate_terms_gb": terms,
            "estimate_source": f"fpm plan (ZeRO-{o.stage}, plus its reserve)"}


def throughput_stage(st: Stage) -> None:
    from fpm.engine.metrics import read_metrics

    ctx = st.ctx
    # on a CPU what train.precision: auto picks there (an AVX2 CPU emulates bf16: its bf16 rows timed out)
    precisions = [Context._auto_precision_cpu()] if ctx.cpu else ["bf16", "fp16"]
    for family, (recipe_name, sets, micro, steps) in shapes(ctx).items():
        data: list[Path] = []
        for precision in precisions:
            row = f"{family}-{precision}"
            out = _fresh(ctx.work / f"speed-{family}-{precision}")
            train_sets = sets + [f"train.precision={precision}", "train.activation_checkpointing=true",
                                 f"train.global_batch={micro}", f"train.micro_batch={micro}", "train.grad_accum=1"]

            def ours(until: float, out=out, train_sets=train_sets, precision=precision, row=row) -> dict:
                peak = measured_peak(ctx, precision)
                window = max(2, steps // 5)
                args = ["pretrain", recipe_name, "--preset", "tiny", "--out", str(out), "--max-steps", str(steps),
                        "--save-every", str(10 * steps), "--set", f"train.log_every={window}",
                        "--set", f"train.peak_tflops={peak}", *[x for s in train_sets for x in ("--set", s)]]
                if data:
                    args += ["--data", str(data[0])]
                done = fpm(*args, log=ctx.work / "logs" / f"speed-{row}.log", until=until)
                data[:] = data or [out / "data"]
                ms = [m for m in read_metrics(out) if "tokens_per_s" in m][1:]  # the first window includes warm-up
                value = {"tokens_per_s": sorted(m["tokens_per_s"] for m in ms)[len(ms) // 2],
                         "mfu": sorted(m["mfu"] for m in ms)[len(ms) // 2], "peak_tflops_measured": peak}
                value.update(memory_estimate(ctx, recipe_name, train_sets, micro))
                if ctx.cpu:  # the host's peak RSS (what the launch check estimates on a CPU)
                    value["host_peak_rss_gb"] = done.maxrss_gb
                    value["memory_ratio"] = done.maxrss_gb / value["estimate_gb"]
                else:  # torch.cuda.max_memory_allocated, as the trainer logs it
                    value["gpu_mem_gb"] = max((m.get("gpu_mem_gb") or 0.0) for m in ms) or None
                    value["memory_ratio"] = value["gpu_mem_gb"] / value["estimate_gb"] if value["gpu_mem_gb"] else None
                return value

            def theirs(until: float, precision=precision, row=row) -> dict:
                hf = hf_throughput(ctx, family, recipe_name, sets, micro, steps, precision, data[0], until)
                return {"tokens_per_s": hf, "fpm_over_trainer": st.cells[f"{row} fpm"]["tokens_per_s"] / hf}

            st.cell(f"{row} fpm", ours, budget="speed")
            st.cell(f"{row} Trainer", theirs, budget="speed", needs=(f"{row} fpm",))


def hf_throughput(ctx: Context, family: str, recipe_name: str, sets: list[str], micro: int, steps: int,
                  precision: str, data: Path, until: float) -> float:
    """transformers.Trainer on the same model shape, data and precision, in a fresh process."""
    cmd = [sys.executable, __file__, "--hf-worker", json.dumps({
        "family": family, "recipe": recipe_name, "sets": sets, "micro": micro, "steps": steps,
        "precision": precision, "data": str(data), "out": str(ctx.work / f"hf-{family}-{precision}"),
        "cpu": ctx.cpu})]
    done = run(cmd, ctx.work / "logs" / f"hf-{family}-{precision}.log", until)
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]


def hf_worker(spec: dict) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fpm.config import load_recipe
    from hf_baseline import TokenWindows, model_and_collator

    recipe = load_recipe(spec["recipe"], preset="tiny", overrides=spec["sets"])
    model, collator = model_and_collator(spec["family"], recipe, Path(spec["data"]))
    seq = recipe.data.seq_len
    windows = TokenWindows(Path(spec["data"]), seq, min_windows=spec["micro"] * spec["steps"])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=spec["out"], per_device_train_batch_size=spec["micro"],
                             max_steps=spec["steps"], bf16=spec["precision"] == "bf16",
                             fp16=spec["precision"] == "fp16", gradient_checkpointing=True, learning_rate=1e-4,
                             warmup_steps=2, weight_decay=0.01, max_grad_norm=1.0, logging_steps=spec["steps"],
                             save_strategy="no", report_to=[], use_cpu=spec["cpu"], dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=windows, data_collator=collator, callbacks=[Clock()]).train()
    skip = max(2, len(times) // 5)
    dt = (times[-1] - times[skip]) / (len(times) - 1 - skip)
    print(json.dumps({"tokens_per_s": spec["micro"] * seq / dt}))


# ------------------------------------------------------------------ the self-test's stages


def selftest_stage(st: Stage) -> None:
    """Cells that pass, raise, run out of time in a process they started and in their own work, in that
    order, and one after them."""
    st.cell("passes", lambda until: {"ok": True})

    def raises(until):
        raise RuntimeError("a cell that raises (self-test)")

    st.cell("raises", raises)
    st.cell("sleeps", lambda until: run([sys.executable, "-c", "import time; time.sleep(600)"],
                                        st.ctx.work / "logs" / "selftest-sleep.log", until), budget="selftest_cell")
    st.cell("hangs here", lambda until: time.sleep(600), budget="selftest_cell")
    st.cell("after the timeout", lambda until: {"ok": True})


def selfhang_stage(st: Stage) -> None:
    """A cell recorded, then a hang that only the stage's budget ends."""
    st.cell("before the hang", lambda until: {"ok": True})
    time.sleep(3600)


def selfskip_stage(st: Stage) -> None:
    st.cell("never runs when out of time", lambda until: {"ok": True})


STAGES = {"env": env_stage, "sdpa": sdpa_stage, "equivalence": equivalence_stage, "nccl": nccl_stage,
          "resume": resume_stage, "export": export_stage, "finetune": finetune_stage,
          "throughput": throughput_stage, "selftest": selftest_stage, "selfhang": selfhang_stage,
          "selfskip": selfskip_stage}


def stage_worker(name: str, state_file: Path) -> int:
    """The child process of one stage."""
    _GENTLE["on_term"] = False
    signal.signal(signal.SIGTERM, _on_term)
    state = json.loads(state_file.read_text())
    st = Stage(Context(state), name, state["deadline"], Store(Path(state["out"])))
    try:
        STAGES[name](st)
    except Timeout as e:
        st.set(stage_status="timeout", reason=str(e))
        return 1
    except Exception as e:  # noqa: BLE001 - recorded; the driver goes on with the next stage
        st.set(stage_status="error", reason=f"{type(e).__name__}: {e}"[:3000],
               traceback=traceback.format_exc()[-3000:])
        return 1
    return 0


# ------------------------------------------------------------------ the report


def cell_text(stage: str, key: str, v: dict) -> str:
    status = v.get("status", "?")
    timed = "seconds" in v and "budget_s" in v
    head = status.upper() + (f" ({v['seconds']:.0f} s of {v['budget_s']:.0f})" if timed else "")
    if status in ("error", "timeout", "skipped", "n/a"):
        return f"{head}: {v.get('reason', '')}"
    try:
        if stage == "env" and key == "versions":
            detail = (f"{v['device']} | torch {v['torch']} | transformers {v['transformers']} | deepspeed "
                      f"{v['deepspeed']} | {v['cuda_device_count']} GPU(s)")
        elif stage == "env":
            detail = (f"{v['workload']}: {v['measured']:g} {v['unit']} (reference {v['reference']:g}): "
                      f"budgets x {v['scale']:.2f}")
        elif stage == "sdpa":
            detail = v["op"]
        elif stage in ("equivalence", "nccl"):
            detail = ("reference" if v.get("role") == "reference" else
                      f"loss rel {v['loss_rel']:.1e}, weight rel {v['weight_rel']:.1e} against {v['reference']}")
        elif stage == "resume" and key == "killed and resumed":
            detail = f"resumed at step {v['resumed_from']}"
        elif stage == "resume" and key == "agreement":
            detail = (f"max |dloss| resumed {v['max_abs_loss_diff_resumed']:.2e} (two uninterrupted runs: "
                      f"{v['max_abs_loss_diff_rerun']:.2e})")
        elif stage == "resume":
            detail = f"{v['steps']} steps logged, last loss {v['last_loss']:.4f}"
        elif stage == "export" or key == "padding-free logits":
            detail = f"max |d logits| {v['max_abs_logit_diff']:.2e}" + (
                " against plain transformers" if stage == "export" else " padding-free vs padded")
        elif stage == "finetune":
            detail = f"dev accuracy {v['dev_accuracy']:.3f} on {v['n_dev']} examples, evaluated on {v['device']}"
        elif stage == "throughput" and key.endswith("Trainer"):
            detail = f"{v['tokens_per_s']:,.0f} tok/s; fpm/Trainer {v['fpm_over_trainer']:.2f}"
        elif stage == "throughput":
            terms = ", ".join(f"{k} {x:g}" for k, x in v["estimate_terms_gb"].items())
            if "gpu_mem_gb" in v:
                mem = (f"GPU memory peak (max allocated) {v['gpu_mem_gb']:.2f} GB vs the launch check's "
                       f"{v['estimate_gb']:.2f} GB (x{v['memory_ratio']:.2f}; {terms})"
                       if v["gpu_mem_gb"] else "no GPU memory logged")
            else:
                mem = (f"host peak RSS {v['host_peak_rss_gb']:.2f} GB vs the launch check's {v['estimate_gb']:.2f} "
                       f"GB (x{v['memory_ratio']:.2f}; {terms})")
            detail = (f"{v['tokens_per_s']:,.0f} tok/s, MFU {100 * v['mfu']:.1f}% of "
                      f"{v['peak_tflops_measured']:.1f} TFLOP/s measured; {mem}")
        else:
            detail = ""
    except (KeyError, TypeError, ValueError):
        detail = ", ".join(f"{k}={x}" for k, x in v.items() if k not in ("status", "seconds", "budget_s"))
    return f"{head}: {detail}" if detail else head


def stage_status(stage: dict) -> str:
    """A stage is its worst cell, or what ended it (an error or timeout outside any cell)."""
    statuses = [c.get("status", "error") for c in stage.get("cells", {}).values()]
    return worst(statuses + ([stage["stage_status"]] if "stage_status" in stage else []))


def summary_line(results: dict) -> tuple[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "n/a": 0}
    for stage in results["stages"].values():
        s = stage["status"]
        counts["passed" if s in PASSED else "failed" if s in FAILED else "skipped" if s in SKIPPED else "n/a"] += 1
    code = 1 if counts["failed"] or counts["skipped"] else 0
    line = (f"gpu_check: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
            f"(out of time), {counts['n/a']} n/a (hardware not here) of {len(results['stages'])} stages; exit {code}")
    return line, code


def table(results: dict) -> str:
    env = results["stages"].get("env", {}).get("cells", {}).get("versions", {})
    cal = results.get("calibration") or {}
    head = [env["device"]] if "device" in env else []
    head += [f"{k} {env[k]}" for k in ("torch", "transformers", "deepspeed") if k in env]
    head += [f"budgets x {results['scale']:.2f}" + (f" ({cal['measured']:g} {cal['unit']} measured)" if cal else ""),
             f"{results['wall_s']:.0f} s of {results['budget_s']:.0f}"]
    lines = [f"fpm gpu_check ({results['mode']}): " + " | ".join(head)]
    for name, stage in results["stages"].items():
        cells = stage.get("cells", {})
        secs = f"{stage['seconds']:5.0f} s of {stage['budget_s']:4.0f}" if "seconds" in stage else " " * 13
        bad = [f"{k}: {c.get('status')}" for k, c in cells.items() if c.get("status") not in PASSED + NA]
        passed = sum(c.get("status") in PASSED for c in cells.values())
        detail = stage.get("reason") or f"{passed}/{len(cells)} cells pass"
        if bad:
            detail += "; not passed: " + ", ".join(bad)
        lines.append(f"{name:12s} {stage['status']:8s} {secs}  {detail}")
    return "\n".join(lines)


# ------------------------------------------------------------------ driver


def work_folder(arg: str | None) -> Path:
    """--work, or a fresh temporary folder; never inside this checkout."""
    work = Path(arg).resolve() if arg else Path(tempfile.mkdtemp(prefix="fpm-gpu-check-"))
    if work == ROOT or ROOT in work.parents:
        sys.exit(f"gpu_check: --work {work} is inside the checkout {ROOT}: give a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    return work


def parse_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in BUDGETS or not value:
            sys.exit(f"gpu_check: --stage-budget {item!r}: expected KEY=SECONDS, KEY one of {', '.join(BUDGETS)}")
        out[key] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="the same checks at tiny shapes on the CPU")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON of results, rewritten as each cell finishes")
    ap.add_argument("--work", default=None,
                    help="scratch folder, outside the checkout (default: a fresh temporary one)")
    ap.add_argument("--budget-s", "--timeout", dest="budget_s", type=float, default=330.0,
                    help="the whole run's budget, seconds: no stage runs past it; stages left are skipped")
    ap.add_argument("--stage-budget", action="append", default=[], metavar="KEY=SECONDS",
                    help=f"a budget in seconds instead of the scaled default; KEY: {', '.join(BUDGETS)}")
    ap.add_argument("--scale", type=float, default=None,
                    help="multiply the default budgets by this instead of the measured calibration; the env stage "
                         "then runs only when --only names it")
    ap.add_argument("--only", default=None, help="comma-separated stages (env always runs first, unless --scale)")
    ap.add_argument("--two-procs-on-cpu", action="store_true", help=argparse.SUPPRESS)  # the nccl stage over gloo
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:  # a stage's worker: the driver set the environment up
        sys.exit(stage_worker(args.stage, Path(args.state)))
    if args.hf_worker:
        hf_worker(json.loads(args.hf_worker))
        return
    overrides = parse_overrides(args.stage_budget)
    wanted = args.only.split(",") if args.only else list(STAGE_ORDER)
    unknown = [n for n in wanted if n not in STAGES]
    if unknown:
        sys.exit(f"gpu_check: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGE_ORDER)}")
    if args.scale is None and "env" not in wanted:
        wanted.insert(0, "env")
    order = [n for n in STAGE_ORDER + SELF_TEST if n in wanted]
    boot = bootstrap()
    if boot.get("missing"):
        sys.exit(f"gpu_check: cannot import {', '.join(boot['missing'])} ({boot.get('wheels', 'no ' + str(WHEELS))}); "
                 "make the wheels with bench/gpu_wheels.sh and bring bench/wheels along")
    work = work_folder(args.work)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    store = Store(out)
    t0 = time.time()
    scale = args.scale or 1.0
    results = {"mode": "cpu" if args.cpu else "gpu", "budget_s": args.budget_s, "scale": scale, "calibration": None,
               "work": str(work), "stages": {}}
    store.save(results)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_term)
    print(f"gpu_check ({results['mode']}): stages {', '.join(order)}; budget {args.budget_s:.0f} s; "
          f"work folder {work}; results {out}", flush=True)
    device_count = None
    for name in order:
        left = args.budget_s - (time.time() - t0)
        reason = nccl_not_applicable(args.cpu, device_count, args.two_procs_on_cpu) if name == "nccl" else None
        if reason:
            store.update_stage(name, status="n/a", reason=reason)
        elif left < MIN_STAGE_S:
            store.update_stage(name, status="skipped", reason=f"out of time ({max(0.0, left):.0f} s of the "
                                                              f"{args.budget_s:.0f} s budget left)")
        else:
            ctx = Context({"cpu": args.cpu, "scale": scale, "overrides": overrides, "work": str(work)})
            budget = min(ctx.default(name), left)
            print(f"[{name}] budget {budget:.0f} s", flush=True)
            state = {"cpu": args.cpu, "work": str(work), "out": str(out), "scale": scale, "overrides": overrides,
                     "bootstrap": boot, "two_procs_on_cpu": args.two_procs_on_cpu, "deadline": time.time() + budget}
            state_file = work / f"state-{name}.json"
            state_file.write_text(json.dumps(state))
            t = time.time()
            log = work / "logs" / f"stage-{name}.log"
            try:
                done = run([sys.executable, __file__, "--stage", name, "--state", str(state_file)], log,
                           state["deadline"] + GRACE_S, check=False, passthrough=True, gentle=True)
                killed = None if done.returncode == 0 or "stage_status" in store.load()["stages"].get(name, {}) \
                    else f"its worker exited {done.returncode}: {done.stderr.strip()[-1500:]} (log: {log})"
                extra = {"stage_status": "error", "reason": killed} if killed else {}
            except Timeout:
                extra = {"stage_status": "timeout", "reason": f"the stage ran past its budget of {budget:.0f} s "
                                                              "and was killed; the cells it finished are kept"}
            stage = store.update_stage(name, seconds=round(time.time() - t, 2), budget_s=round(budget, 1), **extra)
            store.update_stage(name, status=stage_status(stage))
            if name == "env":
                cells = stage.get("cells", {})
                cal, versions = cells.get("calibration", {}), cells.get("versions", {})
                device_count = versions.get("cuda_device_count")
                if args.scale is None and cal.get("status") == "pass":
                    scale = cal["scale"]
                    results = store.load()
                    results.update(scale=scale, calibration=cal)
                    store.save(results)
                if not args.cpu and versions.get("cuda_available") is False:
                    print("gpu_check: no CUDA device: run with --cpu for the CPU variant", file=sys.stderr)
                    sys.exit(2)
        stage = store.load()["stages"][name]
        print(f"[{name}] {stage['status'].upper()}" + (f" in {stage['seconds']:.0f} s" if "seconds" in stage else "")
              + (f": {stage['reason']}" if stage.get("reason") else ""), flush=True)
    results = store.load()
    results["wall_s"] = round(time.time() - t0, 1)
    line, code = summary_line(results)
    results["summary"] = line
    results["exit_code"] = code
    store.save(results)
    print(table(results))
    print(line, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
