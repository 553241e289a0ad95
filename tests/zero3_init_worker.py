"""Build each family at ZeRO-3 under ``deepspeed.zero.Init`` in bf16, for tests/test_models.py.

One process, gloo. The reference is the same recipe built whole in fp32 on the CPU (ZeRO 0-2),
cast to bf16. Under zero.Init a draw made on the parameter itself comes from elsewhere, as on a GPU
(CUDA's generator, in the parameter's dtype): ``torch.Tensor.normal_`` on a parameter, or on any
tensor that is not float32, draws from another generator. Prints one JSON line: per family, the
parameters that differ from the reference and whether the CPU's generator ends where it does
after the whole-model build.
"""

import json
import sys

import torch

from fpm.config import load_recipe
from fpm.engine.distributed import init, resolve_env, teardown
from fpm.engine.setup import model_init_context
from fpm.engine.spec import pretraining_spec
from fpm.models import build_model
from fpm.models.init import gathered


def check(name: str) -> dict:
    recipe = load_recipe(name, preset="tiny", overrides=["deepspeed.zero_stage=3", "train.precision=bf16"])
    cfg, vocab, seed = recipe.model, recipe.tokenizer.vocab_size, recipe.train.seed
    want = {k: v.to(torch.bfloat16) for k, v in build_model(cfg, vocab, seed=seed).state_dict().items()}
    want_rng = torch.get_rng_state()
    torch.manual_seed(seed + 7)  # build_model(seed=...) must not depend on what came before
    orig, other = torch.Tensor.normal_, torch.Generator().manual_seed(seed + 1)

    def normal_(self, mean=0.0, std=1.0, *, generator=None):
        elsewhere = isinstance(self, torch.nn.Parameter) or self.dtype != torch.float32
        return orig(self, mean, std, generator=other if elsewhere else generator)

    torch.Tensor.normal_ = normal_
    try:
        with model_init_context(pretraining_spec(recipe, 1, 0.0)):
            model = build_model(cfg, vocab, seed=seed)
    finally:
        torch.Tensor.normal_ = orig
    same_rng = torch.equal(torch.get_rng_state(), want_rng)
    params = list(model.parameters())
    partitioned = all(hasattr(p, "ds_id") for p in params)
    with gathered(params):
        got = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"partitioned": partitioned, "dtypes": sorted({str(v.dtype) for v in got.values()}),
            "differ": [k for k in want if not torch.equal(want[k], got[k])], "same_rng": same_rng}


if __name__ == "__main__":
    dist = resolve_env()
    init(dist)
    try:
        print(json.dumps({name: check(name) for name in sys.argv[1:]}))
    finally:
        teardown()
