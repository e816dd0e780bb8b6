"""Length groups under DeepSpeed ZeRO-2 on two ranks, as the ppo stage trains there: each rank scores its
own rows in groups (sharing prompts), DeepSpeed's backward reduces the gradients over the ranks, and the
result equals the mean of the ranks' one-pass gradients."""

import os

import pytest
import torch

from posttrain.models import ModelConfig, build_tiny_model, load_model, save_model_dir
from posttrain.rollout import token_logprobs

from .conftest import TINY
from .test_lean_logprobs import _varied_batch

TEMPERATURE = 0.8


def _grouped_on_rank(rank: int, port: int, model_dir: str, batches: list, weights: list, out_dir: str) -> None:
    rank_env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **rank_env)
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_grad

    from posttrain import rollout
    from posttrain.config import DistributedConfig
    from posttrain.dist.trainable import DeepSpeedTrainable, init_process_state

    rollout.GROUP_MIN_POSITIONS = 0  # tiny rows: take any split that saves positions
    dcfg = DistributedConfig(num_processes=2, zero_stage=2)
    init_process_state(dcfg, torch.device("cpu"))
    model = load_model(model_dir, device="cpu", dtype=torch.float32).train()
    handle = DeepSpeedTrainable(model, 1e-3, 1.0, dcfg, micro_batch=len(batches[rank].input_ids))
    passes = []
    handle.module.model.register_forward_pre_hook(lambda *_: passes.append(1))
    logp = token_logprobs(handle.module, batches[rank], TEMPERATURE)
    handle.engine.backward((logp * weights[rank]).sum())
    grads = {name: safe_get_full_grad(p).clone() for name, p in handle.module.named_parameters()}
    torch.save({"passes": len(passes), "logp": logp.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_length_groups_under_zero2_reduce_to_the_one_pass_gradient(tmp_path, tiny_tokenizer, family, monkeypatch):
    from posttrain import rollout
    from posttrain.dist.launcher import _free_port

    model_dir = save_model_dir(
        build_tiny_model(ModelConfig(family=family, **TINY), tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "m"
    )
    batches = [_varied_batch(len(tiny_tokenizer), seed=rank) for rank in range(2)]
    weights = [
        torch.randn(b.input_ids.shape, generator=torch.Generator().manual_seed(9 + i)) for i, b in enumerate(batches)
    ]
    torch.multiprocessing.spawn(
        _grouped_on_rank, args=(_free_port(), str(model_dir), batches, weights, str(tmp_path)), nprocs=2
    )

    # One pass per rank's batch, no DeepSpeed: the gradients DeepSpeed must have averaged.
    monkeypatch.setattr(rollout, "length_groups", lambda *_: None)
    monkeypatch.setattr(rollout, "shared_prompt_plan", lambda *_: None)
    model = load_model(model_dir, device="cpu", dtype=torch.float32).train()
    params = dict(model.named_parameters())
    want_logp, want_grads = [], []
    for batch, w in zip(batches, weights, strict=True):
        logp = token_logprobs(model, batch, TEMPERATURE)
        want_logp.append(logp.detach())
        want_grads.append(torch.autograd.grad((logp * w).sum(), list(params.values())))
    mean_grads = {name: (a + b) / 2 for name, a, b in zip(params, *want_grads, strict=True)}

    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["passes"] > 1  # the rank scored its rows in groups
        assert torch.allclose(got["logp"], want_logp[rank], atol=1e-5)
        assert got["grads"].keys() == mean_grads.keys()
        for name, grad in got["grads"].items():
            assert torch.allclose(grad, mean_grads[name], atol=1e-5, rtol=1e-4), name
