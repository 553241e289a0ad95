"""Devices, peaks and DeepSpeed's configuration (issue 16): what a GPU run is given, tested on CPU."""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest
import torch

from fpm.engine import peak
from fpm.engine.distributed import device_for, gpu_index, init, resolve_env, select_accelerator
from fpm.config.schema import DeepSpeedCfg, LossScaleCfg
from fpm.engine.ds_config import deepspeed_config
from fpm.errors import FpmError


def test_the_accelerator_is_what_torch_sees_not_dev_nvidia0(monkeypatch):
    # a container given one GPU may have neither /dev/nvidia0 nor CUDA_VISIBLE_DEVICES
    with mock.patch.dict(os.environ):  # select_accelerator writes DS_ACCELERATOR: undone afterwards
        os.environ.pop("DS_ACCELERATOR", None)
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert select_accelerator() == "cuda" and os.environ["DS_ACCELERATOR"] == "cuda"
        del os.environ["DS_ACCELERATOR"]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
        assert select_accelerator() == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"


def test_one_gpu_per_task_is_gpu_0_for_every_local_rank(monkeypatch):
    # srun --gpus-per-task=1 (or a site's binding): each task sees one GPU while SLURM_LOCALID runs 0-7
    assert [gpu_index(r, 8, 1) for r in range(8)] == [0] * 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [device_for(r, 8) for r in range(8)] == [torch.device("cuda", 0)] * 8
    assert device_for(3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for(3, 8) == torch.device("cpu")


def test_whole_node_visibility_gives_each_rank_its_own_gpu(monkeypatch):
    assert [gpu_index(r, 8, 8) for r in range(8)] == list(range(8))
    assert [gpu_index(r, 4, 8) for r in range(4)] == list(range(4))  # more GPUs than ranks
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert [device_for(r, 8).index for r in range(8)] == list(range(8))


@pytest.mark.parametrize("local_rank", [0, 3, 7])
def test_more_ranks_than_gpus_is_a_one_line_error_naming_the_fix(monkeypatch, local_rank):
    # two ranks on one GPU cannot work with NCCL: no round-robin sharing
    with pytest.raises(FpmError) as err:
        gpu_index(local_rank, 8, 4)
    msg = str(err.value)
    assert "\n" not in msg and "8 ranks" in msg and "4 GPUs" in msg
    assert "--ntasks-per-node=4" in msg and "--gpus-per-task=1" in msg and "--gpus-per-node=8" in msg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(FpmError):
        device_for(local_rank, 8)
    with pytest.raises(FpmError):
        device_for(5)  # a rank beyond the GPUs: no longer GPU 1
    with pytest.raises(FpmError):
        gpu_index(0, 1, 0)


_LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")


def _resolve(monkeypatch, visible: int | None, env: dict[str, str]):
    """resolve_env() under ``env`` (a launcher's variables) with ``visible`` GPUs (None: no GPU)."""
    for k in list(os.environ):
        if k in _LAUNCH or k.startswith("SLURM_"):
            del os.environ[k]
    os.environ.update(MASTER_ADDR="10.0.0.1", **env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible is not None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible or 0)
    return resolve_env()


SRUN_RANK_3 = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "8",
               "SLURM_JOB_ID": "4242"}


@pytest.mark.parametrize("visible, want", [(1, 0), (8, 3)])
def test_local_rank_is_rewritten_to_the_gpu_deepspeed_must_use(monkeypatch, visible, want):
    with mock.patch.dict(os.environ):  # resolve_env writes the launcher's variables: undone afterwards
        dist = _resolve(monkeypatch, visible, SRUN_RANK_3)
        assert (dist.rank, dist.world_size, dist.local_rank, dist.local_world_size) == (11, 16, 3, 8)
        assert dist.backend == "nccl" and dist.device_index == want and os.environ["LOCAL_RANK"] == str(want)
        assert device_for(dist.local_rank, dist.local_world_size) == torch.device("cuda", want)
        # what DeepSpeed is started with: set_device and LOCAL_RANK name the same GPU
        import deepspeed

        seen = {}
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d))
        monkeypatch.setattr(deepspeed, "init_distributed",
                            lambda **kw: seen.setdefault("LOCAL_RANK", os.environ["LOCAL_RANK"]))
        init(dist)
        assert seen == {"set_device": want, "LOCAL_RANK": str(want)}
        # torchrun's variables, and resolving again in the same process, give the same GPU
        again = resolve_env()
        assert again.device_index == want and os.environ["LOCAL_RANK"] == str(want)
        tr = _resolve(monkeypatch, visible, {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                                             "LOCAL_WORLD_SIZE": "8", "MASTER_PORT": "29500"})
        assert (tr.local_rank, tr.device_index, os.environ["LOCAL_RANK"]) == (3, want, str(want))


def test_more_ranks_than_gpus_stops_before_deepspeed_and_the_cpu_keeps_local_rank(monkeypatch):
    with mock.patch.dict(os.environ):
        with pytest.raises(FpmError, match="--gpus-per-task=1"):
            _resolve(monkeypatch, 4, SRUN_RANK_3)
        dist = _resolve(monkeypatch, None, SRUN_RANK_3)
        assert dist.backend == "gloo" and dist.device_index is None and dist.local_rank == 3
        assert os.environ["LOCAL_RANK"] == "3" and device_for(dist.local_rank) == torch.device("cpu")


@pytest.mark.parametrize("name, precision, want", [
    ("NVIDIA A100-SXM4-40GB", "bf16", 312.0), ("NVIDIA A100 80GB PCIe", "fp16", 312.0),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H200 NVL", "bf16", 835.0), ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L4", "bf16", 121.0), ("NVIDIA A100-SXM4-80GB", "tf32", 156.0), ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("Tesla V100-SXM2-32GB", "bf16", None), ("Some Future GPU", "bf16", None)])
def test_datasheet_peaks_are_dense_and_specific_names_win(name, precision, want):
    assert peak.datasheet(name, precision) == want


def test_the_peak_is_given_else_the_datasheet_else_measured_and_cached(monkeypatch, tmp_path):
    assert peak.resolve("bf16", given=123.0).as_dict() == {"tflops": 123.0, "source": "given",
                                                          "detail": "train.peak_tflops"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    got = peak.resolve("bf16")
    assert (got.tflops, got.source) == (989.4, "datasheet") and "H200, bf16" in got.detail
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak.resolve("fp32").tflops == 66.9
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak.resolve("fp32").tflops == 494.7
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    monkeypatch.setattr(peak, "measure_tflops", lambda *a, **k: calls.append(a) or 1.5)
    cache = tmp_path / "peak.json"
    first = peak.resolve("bf16", cache=cache)
    assert (first.tflops, first.source) == (1.5, "measured") and len(calls) == 1
    assert peak.resolve("bf16", cache=cache).tflops == 1.5 and len(calls) == 1  # a resumed run reuses it
    peak.resolve("fp32", cache=cache)
    assert len(calls) == 2  # another precision is measured again


def test_measuring_the_peak_leaves_the_random_stream_alone():
    state = torch.get_rng_state()
    assert peak.measure_tflops(torch.float32, seconds=0.01, n=64) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_every_deepspeed_key_reaches_deepspeeds_configuration():
    from fpm.config import load_recipe
    from fpm.engine.setup import spec_ds_config
    from fpm.engine.spec import pretraining_spec

    def cfg(*sets):
        recipe = load_recipe("cpm-x-s", preset="tiny", overrides=list(sets))
        return spec_ds_config(pretraining_spec(recipe, 1, 0.0))

    base = cfg("deepspeed.zero_stage=2")["zero_optimization"]
    changed = {"overlap_comm": ("false", False), "contiguous_gradients": ("false", False),
               "reduce_bucket_size": ("12345", 12345), "allgather_bucket_size": ("23456", 23456)}
    for key, (text, value) in changed.items():
        assert base[key] != value
        assert cfg("deepspeed.zero_stage=2", f"deepspeed.{key}={text}")["zero_optimization"][key] == value
    offload = cfg("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true")
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg("deepspeed.zero_stage=1")["zero_optimization"]["stage"] == 1
    # bf16 gradients accumulate in fp32 under ZeRO (DeepSpeed's default keeps them in bf16)
    assert cfg("deepspeed.zero_stage=2", "train.precision=bf16")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in cfg("deepspeed.zero_stage=2")


@pytest.mark.e2e
def test_the_run_writes_every_deepspeed_key_into_ds_config_json(tmp_path, cli):
    out = tmp_path / "run"
    cli("pretrain", "cpm-x-s", "--preset", "tiny", "--out", str(out), "--max-steps", "2", "--save-every", "2",
        "--set", "deepspeed.zero_stage=2", "--set", "deepspeed.offload_optimizer=true",
        "--set", "deepspeed.overlap_comm=false",
        "--set", "deepspeed.contiguous_gradients=false", "--set", "deepspeed.reduce_bucket_size=12345",
        "--set", "deepspeed.allgather_bucket_size=23456", "--set", "train.precision=bf16", check=True)
    z = json.loads((out / "ds_config.json").read_text())
    assert z["zero_optimization"]["stage"] == 2 and z["data_types"] == {"grad_accum_dtype": "fp32"}
    assert (z["zero_optimization"]["overlap_comm"], z["zero_optimization"]["contiguous_gradients"]) == (False, False)
    assert (z["zero_optimization"]["reduce_bucket_size"], z["zero_optimization"]["allgather_bucket_size"]) == \
        (12345, 23456)
    assert z["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # offload_param: ZeRO-3, above
    run = json.loads((out / "run.json").read_text())
    assert run["peak"]["source"] == "measured" and run["peak"]["tflops"] > 0 and run["device"].startswith("cpu")


def _predict_worker(rank: int, port: int, features: dict, out: dict) -> None:
    import torch.distributed as td

    from fpm.eval.predict import predict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    out[rank] = predict(_Classifier(), features, batch_size=3)
    td.destroy_process_group()


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 4)
        self.config = type("C", (), {"num_labels": 4})

    def forward(self, input_ids, **_):
        return type("O", (), {"logits": self.emb(input_ids).sum(1)})


@pytest.mark.e2e
def test_prediction_is_shared_between_ranks_and_gathered_in_order():
    import torch.multiprocessing as mp

    from fpm.engine.distributed import _free_port
    from fpm.eval.predict import predict

    features = {"input_ids": np.arange(11 * 5).reshape(11, 5) % 50}
    want = predict(_Classifier(), features, batch_size=3)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_predict_worker, args=(_free_port(), features, out), nprocs=2)
        got = dict(out)
    assert want.shape == (11, 4)
    for rank in (0, 1):  # every rank returns every row, in input order
        np.testing.assert_allclose(got[rank], want, rtol=1e-6)


def test_fp16_deepspeed_config_has_dynamic_loss_scaling():
    cfg = deepspeed_config(global_batch=1024, micro_batch=16, grad_accum=8, grad_clip=1.0,
                           precision="fp16", deepspeed=DeepSpeedCfg(zero_stage=1),
                           loss_scale=LossScaleCfg(initial_scale_power=12, loss_scale_window=500, hysteresis=3,
                                                   min_loss_scale=0.5))
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
                           "hysteresis": 3, "min_loss_scale": 0.5}
    assert cfg["bf16"] == {"enabled": False} and cfg["gradient_clipping"] == 1.0
    assert cfg["train_batch_size"] == 1024 and cfg["gradient_accumulation_steps"] == 8


def test_threads_per_rank_are_fpm_threads_then_slurms_cpus_per_task_then_a_share_of_the_cores(monkeypatch):
    from fpm.engine.distributed import cpu_threads

    for name in ("FPM_THREADS", "SLURM_CPUS_PER_TASK", "FPM_CPUS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [cpu_threads(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cpu_threads(2) == 6
    monkeypatch.setenv("FPM_THREADS", "3")
    assert cpu_threads(2) == 3
    monkeypatch.setenv("FPM_THREADS", "zero")  # not a count: the next rule
    assert cpu_threads(2) == 6
