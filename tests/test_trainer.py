"""The Trainer's set-up, in-process: what it does before the model exists and how it builds it.

The loop itself (resume, spikes, validation, non-finite losses, pre-emption) is tested through the
commands that use it (test_pretrain, test_spikes, test_validation, test_faults); the bit-identical
golden losses pin its arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fpm.config.schema import DeepSpeedCfg
from fpm.engine.distributed import Dist, init, teardown
from fpm.engine.spec import TrainSpec
from fpm.engine.trainer import Trainer
from fpm.errors import FpmError
from fpm.models.objective import Objective


def _spec(**kw) -> TrainSpec:
    base = dict(max_steps=2, global_batch=2, micro_batch=2, grad_accum=1, lr=1e-3, min_lr=0.0, warmup_steps=0,
                schedule="cosine", weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8, grad_clip=1.0, precision="fp32",
                deepspeed=DeepSpeedCfg(zero_stage=0), seed=7)
    base.update(kw)
    return TrainSpec(**base)


def _loss(model, batch):
    return model(batch["x"]).pow(2).mean()


def _dist(port: int) -> Dist:
    return Dist(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                master_port=port, backend="gloo")


def test_the_model_is_built_after_seeding_with_the_specs_seed(tmp_path):
    """Whatever drew from the generators before, the factory sees the state ``spec.seed`` gives:
    a classifier head's weights (fine-tuning) depend on the seed alone."""
    built = []

    def factory():
        built.append(nn.Linear(4, 3))
        return Objective(built[-1], _loss)

    for disturb in (1, 2):
        torch.manual_seed(1000 + disturb)
        torch.rand(disturb)
        Trainer(_spec(seed=7), factory, tmp_path, _dist(0))
    torch.manual_seed(7)
    want = nn.Linear(4, 3)
    for model in built:
        assert torch.equal(model.weight, want.weight) and torch.equal(model.bias, want.bias)
    other = []
    Trainer(_spec(seed=8), lambda: Objective(other.append(nn.Linear(4, 3)) or other[-1], _loss), tmp_path, _dist(0))
    assert not torch.equal(other[0].weight, want.weight)


def test_a_precision_the_device_refuses_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """What DeepSpeed's accelerator says decides (a CPU: no fp16), on any machine the test runs on."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    calls = []
    with pytest.raises(FpmError, match="fp16 training needs a GPU"):
        Trainer(_spec(precision="fp16"), lambda: calls.append(1), tmp_path, _dist(0))
    assert calls == []
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    Trainer(_spec(precision="fp16"), lambda: calls.append(1) or Objective(nn.Linear(2, 2), _loss), tmp_path, _dist(0))
    assert calls == [1]  # where fp16 trains, the factory runs


def test_at_zero_3_the_model_is_partitioned_as_it_is_built(tmp_path, monkeypatch):
    """Under ZeRO-3 no rank holds the whole model at any time: each parameter is partitioned by
    ``deepspeed.zero.Init`` as its module is constructed (at the paper's 10B, ~41 GB of fp32 per
    rank otherwise); at stage 2 the parameters are whole."""
    from fpm.engine.distributed import _free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    init(_dist(int(__import__("os").environ["MASTER_PORT"])))
    try:
        made = {}
        for stage in (2, 3):
            trainer = Trainer(_spec(deepspeed=DeepSpeedCfg(zero_stage=stage)),
                              lambda: Objective(nn.Linear(64, 32), _loss), tmp_path, _dist(0))
            made[stage] = trainer.model.weight
        assert made[2].numel() == 64 * 32 and not hasattr(made[2], "ds_id")
        assert hasattr(made[3], "ds_id") and made[3].ds_numel == 64 * 32 and made[3].numel() == 0
    finally:
        teardown()
