"""``train.precision: auto`` — the precision the hardware computes natively, chosen once per run.

=====================================  ==========  ============================================
hardware                               auto        why
=====================================  ==========  ============================================
CUDA compute capability >= 8.0         bf16        bf16 tensor cores (A100, H100, L4, ...)
CUDA compute capability < 8.0          fp16        no bf16 tensor cores (V100, T4): fp16 with
                                                   dynamic loss scaling
CPU with AMX or AVX-512 BF16           bf16        oneDNN's native bf16 matmuls
any other CPU (AVX2, AVX-512 only)     fp32        PyTorch emulates bf16 there: a 512x512 matmul
                                                   ran ~30x slower than fp32 on an AVX2 EPYC
                                                   (2048x2048: ~500x; bench/RESULTS.md)
=====================================  ==========  ============================================

fp32 on a GPU that has TF32 (capability >= 8.0) runs its matmuls in TF32
(``torch.set_float32_matmul_precision("high")``), as Megatron-LM, litgpt and the Hugging Face Trainer
(``tf32=True``) do. A precision given explicitly is kept; bf16 on a CPU or GPU without it gets a
one-line warning with the expected cost. The choice and its reason go into the run's summary
(``train_precision`` in ``run.json``, and in ``results.json`` for fine-tuning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fpm.cpu.features import NATIVE_BF16_CPU_FLAGS, cpu_info


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on: the device a run trains on and what it computes."""

    device: str  # "cuda" or "cpu"
    name: str = ""
    capability: tuple[int, int] | None = None  # CUDA compute capability
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # /proc/cpuinfo's flags

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return self.capability is not None and self.capability >= (8, 0)
        return any(f in self.cpu_flags for f in NATIVE_BF16_CPU_FLAGS)

    @property
    def has_tf32(self) -> bool:
        return self.device == "cuda" and self.capability is not None and self.capability >= (8, 0)

    def describe(self) -> str:
        if self.device == "cuda":
            cap = ".".join(map(str, self.capability)) if self.capability else "?"
            return f"{self.name or 'CUDA GPU'} (compute capability {cap})"
        return f"{self.name or 'CPU'} ({cpu_kind(self.cpu_flags)})"


def cpu_kind(flags) -> str:
    """The CPU kinds fpm's timings name: AMX, AVX-512 BF16, AVX-512, AVX2 or neither."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "no AVX2"


def detect(device: str | None = None) -> Hardware:
    """The hardware a run trains on: the current CUDA device where there is one, else this CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return Hardware("cuda", torch.cuda.get_device_name(), tuple(torch.cuda.get_device_capability()))
    name, flags = cpu_info()
    return Hardware("cpu", name, cpu_flags=flags)


@dataclass(frozen=True)
class Choice:
    requested: str  # what the recipe says: auto, fp32, bf16 or fp16
    precision: str  # what the run uses
    tf32: bool  # fp32 matmuls in TF32 (GPUs of capability >= 8.0)
    reason: str
    warning: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"precision {self.precision}{' (TF32 matmuls)' if self.tf32 else ''}: {self.reason}"


EMULATED_BF16 = ("PyTorch emulates bf16 there (an AVX2 CPU ran 512x512 bf16 matmuls ~30x slower than fp32, "
                 "2048x2048 ~500x)")


def choose(requested: str, hw: Hardware) -> Choice:
    """The precision for ``requested`` (``auto`` or an explicit one) on ``hw``, with its reason."""
    where = hw.describe()
    if requested == "auto":
        if hw.device == "cuda":
            if hw.native_bf16:
                precision, reason = "bf16", f"auto: {where} computes bf16 natively"
            else:
                precision, reason = "fp16", f"auto: {where} has no bf16 tensor cores; fp16 with dynamic loss scaling"
        elif hw.native_bf16:
            precision, reason = "bf16", f"auto: {where} computes bf16 natively"
        else:
            precision, reason = "fp32", f"auto: {where} has no AVX-512 BF16 or AMX and {EMULATED_BF16}"
        return Choice(requested, precision, precision == "fp32" and hw.has_tf32, reason)
    warning = None
    if requested == "bf16" and not hw.native_bf16:
        if hw.device == "cuda":
            warning = (f"train.precision=bf16 on {where}, which has no bf16 tensor cores: expect it much slower "
                       "than fp16 or fp32; train.precision=auto picks fp16")
        else:
            warning = (f"train.precision=bf16 on {where}: {EMULATED_BF16}; expect training several times slower "
                       "than fp32 (train.precision=auto picks fp32)")
    return Choice(requested, requested, requested == "fp32" and hw.has_tf32, f"given: {requested}", warning)


def apply(choice: Choice) -> None:
    """Process-wide settings of the choice: TF32 for fp32 matmuls and convolutions where chosen."""
    if choice.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (cuDNN's convolutions already are)


def resolve(recipe, device: str | None = None, started_with: str | None = None):
    """``(recipe, choice)``: ``recipe`` (pretraining or fine-tuning) with ``train.precision`` made
    concrete, and why. A resumed run (``started_with``: the precision of the recipe saved in its
    run directory) keeps its precision under ``auto``, on whatever hardware it resumes. Applies the
    choice's process-wide settings (TF32)."""
    requested = recipe.train.precision
    hw = detect(device)
    if requested == "auto" and started_with in ("fp32", "bf16", "fp16"):
        choice = Choice("auto", started_with, started_with == "fp32" and hw.has_tf32,
                        "auto: the precision this run started with")
    else:
        choice = choose(requested, hw)
    apply(choice)
    if choice.precision != requested:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": choice.precision})})
    return recipe, choice


def check_supported(precision: str) -> None:
    """A one-line error, before any work, for a precision DeepSpeed refuses on this device."""
    from deepspeed.accelerator import get_accelerator

    from fpm.errors import FpmError

    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise FpmError("fp16 training needs a GPU: DeepSpeed refuses fp16 on this device. Use "
                       "--set train.precision=bf16 (or fp32) on this machine")


def for_run(recipe, out, dist):
    """:func:`resolve` for a training command writing to run directory ``out``: the precision this
    run started with when ``out`` holds one, said once on rank 0 (with the warning, if any); a
    precision the device does not train in is refused here, before any work."""
    import yaml

    from fpm.console import info, warn
    from fpm.engine.distributed import select_accelerator
    from fpm.rundir import RunDir

    started_with = None
    saved = RunDir(Path(out)).recipe
    if saved.is_file():
        try:
            started_with = (yaml.safe_load(saved.read_text()).get("train") or {}).get("precision")
        except (OSError, yaml.YAMLError, AttributeError):
            pass  # the run directory's own checks report a damaged recipe
    recipe, choice = resolve(recipe, select_accelerator(), started_with)
    check_supported(choice.precision)
    if dist.rank == 0:
        info(choice.line())
        if choice.warning:
            warn(choice.warning)
    return recipe, choice
