"""train.precision: auto (fpm.engine.precision) for each hardware description, and the warning for
a forced bf16 where the hardware emulates it."""

from __future__ import annotations

import pytest

from fpm.engine.precision import Hardware, choose, cpu_kind

AVX2 = frozenset("fpu sse2 avx avx2 fma".split())
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16", "avx512_fp16"}
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}


@pytest.mark.parametrize("capability, precision, tf32", [((7, 0), "fp16", False), ((7, 5), "fp16", False),
                                                        ((8, 0), "bf16", False), ((9, 0), "bf16", False)])
def test_auto_on_gpus(capability, precision, tf32):
    hw = Hardware("cuda", "GPU", capability)
    choice = choose("auto", hw)
    assert (choice.precision, choice.tf32, choice.warning) == (precision, tf32, None)
    assert f"compute capability {capability[0]}.{capability[1]}" in choice.reason


@pytest.mark.parametrize("flags, kind, precision", [(AVX2, "AVX2", "fp32"), (AVX512, "AVX-512", "fp32"),
                                                    (AVX512_BF16, "AVX-512 BF16", "bf16"), (AMX, "AMX", "bf16")])
def test_auto_on_cpus(flags, kind, precision):
    assert cpu_kind(flags) == kind
    choice = choose("auto", Hardware("cpu", "Some CPU", cpu_flags=flags))
    assert (choice.precision, choice.tf32, choice.warning) == (precision, False, None)
    assert f"({kind})" in choice.reason


def test_fp32_on_an_ampere_or_newer_gpu_uses_tf32_and_not_on_volta_or_cpus():
    assert choose("fp32", Hardware("cuda", "A100", (8, 0))).tf32
    assert choose("fp32", Hardware("cuda", "H100", (9, 0))).tf32
    assert not choose("fp32", Hardware("cuda", "V100", (7, 0))).tf32
    assert not choose("fp32", Hardware("cpu", cpu_flags=AMX)).tf32


@pytest.mark.parametrize("hw", [Hardware("cpu", "EPYC", cpu_flags=AVX2), Hardware("cpu", "Xeon", cpu_flags=AVX512),
                                Hardware("cuda", "V100", (7, 0))])
def test_a_forced_bf16_without_native_bf16_is_kept_with_a_one_line_warning(hw):
    choice = choose("bf16", hw)
    assert choice.precision == "bf16" and choice.reason == "given: bf16"
    assert choice.warning and "\n" not in choice.warning and "train.precision=auto picks" in choice.warning
    if hw.device == "cpu":
        assert "slower than fp32" in choice.warning


@pytest.mark.parametrize("hw", [Hardware("cpu", cpu_flags=AMX), Hardware("cpu", cpu_flags=AVX512_BF16),
                                Hardware("cuda", "H100", (9, 0))])
@pytest.mark.parametrize("given", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_silently_where_the_hardware_has_it(hw, given):
    choice = choose(given, hw)
    assert choice.precision == given and choice.warning is None
