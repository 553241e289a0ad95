"""`fpm plan`: agreement with DeepSpeed's estimators and with hand computations; Table 4 audit."""

from __future__ import annotations

import json

import pytest

from fpm.config import load_recipe
from fpm.engine.flops import train_flops_per_token
from fpm.commands.plan import paper_rows, plan
from fpm.engine.memory import activation_bytes_per_sample, bucket_bytes, model_stats, state_bytes



@pytest.mark.parametrize("name", ["bert-e-l", "cpm-x-l"])
@pytest.mark.parametrize("nodes, gpus", [(1, 8), (2, 8)])
def test_model_states_match_deepspeed_estimators(name, nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P, L = model_stats(load_recipe(name))
    n = nodes * gpus
    for offload in (False, True):
        _, gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=offload)
        assert state_bytes(P, L, n, 2, "optimizer" if offload else "none") == pytest.approx(gpu)
    for offload, params in ((False, False), (True, False), (True, True)):
        _, gpu, _ = estimate_zero3_model_states_mem_needs(P, L, gpus, nodes, cpu_offload=offload,
                                                          cpu_offload_params=params)
        mode = "params" if params else ("optimizer" if offload else "none")
        assert state_bytes(P, L, n, 3, mode) == pytest.approx(gpu)


def test_hand_computation_for_bert_e_l():
    r = load_recipe("bert-e-l")
    P, L = model_stats(r)
    assert L == 30522 * 1024 + 30522  # the (tied) MLM output projection with its bias is the largest layer
    assert state_bytes(P, L, 8, 0) == 20 * P
    assert state_bytes(P, L, 8, 1) == pytest.approx(4 * P + 16 * P / 8)
    s, h, a, layers, V = 512, 1024, 16, 70, 30522
    per_layer = s * h * (34 + 5 * a * s / h)  # Megatron: 34sbh + 5as²b bytes, b = 1
    no_ckpt = r.model_copy(update={"train": r.train.model_copy(update={"activation_checkpointing": False})})
    assert activation_bytes_per_sample(no_ckpt, False) == pytest.approx(layers * per_layer + 4 * s * V)
    assert activation_bytes_per_sample(r, True) == pytest.approx(layers * 2 * s * h + per_layer + 4 * s * V)
    # 4h² attention + 8h² FFN per layer; the MLM head (transform + projection) on the 15% masked tokens
    matmul = layers * 12 * h * h + 0.15 * (h * V + h * h)
    assert train_flops_per_token(r.model, V, s) == pytest.approx(6 * matmul + 12 * layers * h * s)
    p = plan(r, nodes=1, gpus_per_node=8, gpu_memory_gb=40)
    assert p.flops_per_step == pytest.approx(train_flops_per_token(r.model, V, s) * 1024 * 512)
    assert p.gpu_hours == pytest.approx(p.flops_total / (312e12 * 0.40) / 3600)
    rec = p.recommendation
    assert rec["micro_batch"] * rec["grad_accum"] * 8 == 1024 and rec["memory_gb"] <= 40


def test_communication_buckets_count_in_gpu_memory():
    r = load_recipe("bert-e-l")
    P, _ = model_stats(r)
    # DeepSpeed's documentation: with overlap_comm, 5e8-element buckets "require 9GB footprint
    # (5e8 x 2Bytes x 2 x 4.5)", and 2e8 "would require 3.6GB"
    assert bucket_bytes(P, 2, r.deepspeed) == pytest.approx(9e9)
    small = load_recipe("bert-e-l", overrides=["deepspeed.reduce_bucket_size=200000000",
                                               "deepspeed.allgather_bucket_size=200000000"])
    assert bucket_bytes(P, 1, small.deepspeed) == pytest.approx(3.6e9)
    plain = load_recipe("bert-e-l", overrides=["deepspeed.overlap_comm=false"])
    assert bucket_bytes(P, 2, plain.deepspeed) == pytest.approx(2 * (5e8 + 5e8))
    assert bucket_bytes(P, 3, r.deepspeed) == pytest.approx(2 * (2 * 5e8 + 5e7))
    assert bucket_bytes(P, 0, r.deepspeed) == pytest.approx(2 * 5e8)
    assert bucket_bytes(1000, 2, r.deepspeed) == pytest.approx(2 * 2000 * 4.5)  # never larger than the model

    def zero2(p):
        return next(o for o in p.options if o.stage == 2 and o.offload == "none")

    big, lean = (plan(x, nodes=1, gpus_per_node=8, gpu_memory_gb=40) for x in (r, small))
    assert zero2(big).buckets_gb == pytest.approx(9.0) and zero2(lean).buckets_gb == pytest.approx(3.6)
    room = (40 - 3 - zero2(big).states_gb - 9.0) / zero2(big).act_per_sample_gb
    assert zero2(big).max_micro_batch == int(room) < zero2(lean).max_micro_batch


def test_cpm_x_l_on_two_dgx_nodes_gets_a_configuration_that_fits():
    p = plan(load_recipe("cpm-x-l"), nodes=2, gpus_per_node=8, gpu_memory_gb=40)
    rec = p.recommendation
    assert rec is not None and rec["zero_stage"] >= 2  # 10B parameters need ZeRO-2 or more on 40 GB
    assert rec["memory_gb"] <= 40 and rec["micro_batch"] * rec["grad_accum"] * 16 == 512
    # one 16 GB GPU in a 64 GB host: full offload needs ~274 GB of host memory, so nothing fits
    none = plan(load_recipe("cpm-x-l"), nodes=1, gpus_per_node=1, gpu_memory_gb=16, cpu_memory_gb=64)
    assert none.recommendation is None and "nothing fits in 16 GB" in none.why_none
    assert none.options[-1].cpu_gb_per_node == pytest.approx(10150016000 * 18 * 1.5 / 1e9)


def test_paper_table4_flops_column_is_gpu_hours_times_peak():
    rows = paper_rows()
    assert len(rows) == 20
    for r in rows:
        assert r["gpu_hours_x_peak_eflops"] == pytest.approx(r["paper_eflops"], rel=0.04), r["model"]
        assert r["implied_mfu"] == pytest.approx(r["fpm_eflops"] / r["gpu_hours_x_peak_eflops"])


def test_cli_plan_json_and_paper(cli):
    data = json.loads(cli("plan", "bert-e-l", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory", "40", "--json",
                          check=True).stdout)
    assert data["recommendation"]["zero_stage"] in (0, 1, 2, 3) and len(data["options"]) == 8
    text = cli("plan", "--paper", check=True).stdout
    assert "GPU-h x 312T" in text and "BERT-E-L" in text and "implied MFU" in text
