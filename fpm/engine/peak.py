"""The denominator of MFU: the peak matmul throughput of the device a run trains on.

In order: a peak given in the recipe (``train.peak_tflops``); on a GPU, the dense (no sparsity)
datasheet figure of the detected model for the run's precision (fp32 counts as TF32 when PyTorch
lets fp32 matmuls use it: ``torch.set_float32_matmul_precision``); otherwise (an unlisted GPU, or a CPU) a short measured matmul probe. The
value and where it came from go into ``run.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# NVIDIA datasheets, dense tensor-core TFLOP/s: (name fragment, {precision: peak}); the first
# fragment found in torch.cuda.get_device_name() wins, so specific names come before general ones.
DATASHEET: list[tuple[str, dict[str, float]]] = [
    ("GB200", {"bf16": 2500.0, "fp16": 2500.0, "tf32": 1250.0, "fp32": 80.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A30", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


@dataclass
class Peak:
    tflops: float  # per device
    source: str  # given | datasheet | measured
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def matmul_precision(precision: str) -> str:
    """The datasheet column a run's matmuls use: bf16, fp16, tf32 or fp32."""
    if precision in ("bf16", "fp16"):
        return precision
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def datasheet(device_name: str, precision: str) -> float | None:
    """The dense peak of a GPU model named like ``torch.cuda.get_device_name()``, or None."""
    for fragment, peaks in DATASHEET:
        if fragment in device_name:
            return peaks.get(precision)
    return None


def measure_tflops(dtype: torch.dtype, device: str | torch.device = "cpu", seconds: float = 0.5,
                   n: int = 2048) -> float:
    """Measured matmul throughput (square ``n`` x ``n`` products) in ``dtype`` on ``device`` with the
    current thread count. Draws from its own generator: the run's random stream is untouched."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if reps % 8 == 0:
            sync()
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def probe_size(dtype: torch.dtype, largest: int = 2048, budget_s: float = 1.0) -> int:
    """The largest square size (a power of two from 256 to ``largest``) whose product should take at
    most ``budget_s`` here, predicted from one product of 256: a CPU without native bf16 or fp16
    emulates them (one bf16 product of 2048 took 61 s on an AVX2 EPYC, against 0.12 s in fp32)."""
    g = torch.Generator().manual_seed(0)  # its own generator: the run's random stream is untouched
    a = torch.randn(256, 256, generator=g).to(dtype)
    a @ a
    t0 = time.perf_counter()
    a @ a
    took = time.perf_counter() - t0
    n = largest
    while n > 256 and took * (n / 256) ** 3 > budget_s:
        n //= 2
    return n


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def resolve(precision: str, *, given: float | None = None, cache: Path | None = None) -> Peak:
    """The peak for a run in ``precision`` (fp32 | bf16 | fp16) on this process's device. A measured
    CPU peak is cached in ``cache`` (keyed by precision and thread count) so a resumed run reuses it."""
    if given:
        return Peak(float(given), "given", "train.peak_tflops")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        col = matmul_precision(precision)
        value = datasheet(name, col)
        if value is not None:
            return Peak(value, "datasheet", f"{name}, {col} dense")
        tflops = measure_tflops(_dtype(precision), "cuda", n=8192)
        return Peak(tflops, "measured", f"{name} not in fpm's table: {_dtype(precision)} matmuls of 8192")
    threads = torch.get_num_threads()
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("precision") == precision and data.get("threads") == threads and "tflops" in data:
            return Peak(float(data["tflops"]), "measured", data.get("detail", "cached"))
    n = probe_size(_dtype(precision))
    detail = f"this CPU, {threads} threads: {_dtype(precision)} matmuls of {n}"
    peak = Peak(measure_tflops(_dtype(precision), n=n), "measured", detail)
    if cache is not None:  # atomically: several ranks may write it
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"precision": precision, "threads": threads, "tflops": peak.tflops,
                                   "detail": detail}))
        os.replace(tmp, cache)
    return peak
