"""Lean scoring inside a wrapper a Trainer hands to its loss (DDP for zero_stage 0, a DeepSpeed engine for
ZeRO-2 and ZeRO-3), as the implicit reward model, SimPO and distillation train on several ranks: each rank
scores its own rows through `forward_through`, the wrapper's backward reduces the gradients over the ranks,
and the result equals the mean of the ranks' one-process gradients. No full-vocabulary logits are made, and
a forward patched onto the model (TRL's fused head) is there again afterwards."""

import os

import pytest
import torch

from posttrain.implicit_rm import sequence_rewards
from posttrain.models import ModelConfig, build_tiny_model, load_model, save_model_dir

from .conftest import TINY
from .test_lean_logprobs import _varied_batch

BETA = 0.5


def _wrapped_on_rank(rank: int, port: int, zero_stage: int, model_dir: str, batches: list, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    from posttrain.config import DistributedConfig
    from posttrain.dist.trainable import DeepSpeedTrainable, forward_through, init_process_state

    dcfg = DistributedConfig(num_processes=2, zero_stage=zero_stage)
    init_process_state(dcfg, torch.device("cpu"))
    model = load_model(model_dir, device="cpu", dtype=torch.float32).train()
    full_forwards = []
    patched = lambda *a, **k: full_forwards.append(1)  # noqa: E731  (a forward on the instance, as TRL patches one)
    model.forward = patched  # the full-logits forward must not run, and stays patched afterwards
    if zero_stage == 0:
        wrapper = torch.nn.parallel.DistributedDataParallel(model)
        module, backward = model, lambda loss: loss.backward()
        full_grad = lambda p: p.grad  # noqa: E731
    else:
        from deepspeed.utils import safe_get_full_grad

        handle = DeepSpeedTrainable(model, 1e-3, 1.0, dcfg, micro_batch=len(batches[rank].input_ids))
        wrapper, module, backward, full_grad = handle.engine, handle.module, handle.engine.backward, safe_get_full_grad
    rewards = forward_through(wrapper, sequence_rewards, batches[rank], BETA)
    backward(rewards.square().sum())
    grads = {name: full_grad(p).clone() for name, p in module.named_parameters()}
    kept = model.__dict__.get("forward") is patched
    torch.save(
        {"rewards": rewards.detach(), "grads": grads, "full_forwards": len(full_forwards), "kept": kept},
        f"{out_dir}/{rank}",
    )
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,family", [(0, "gemma2"), (2, "gemma2"), (3, "llama")])
def test_wrapped_lean_scoring_reduces_to_the_mean_gradient(tmp_path, tiny_tokenizer, zero_stage, family):
    from posttrain.dist.launcher import _free_port

    model = build_tiny_model(ModelConfig(family=family, **TINY), tiny_tokenizer, seed=1)
    model_dir = save_model_dir(model, tiny_tokenizer, tmp_path / "m")
    batches = [_varied_batch(len(tiny_tokenizer), seed=rank) for rank in range(2)]
    args = (_free_port(), zero_stage, str(model_dir), batches, str(tmp_path))
    torch.multiprocessing.spawn(_wrapped_on_rank, args=args, nprocs=2)

    model = load_model(model_dir, device="cpu", dtype=torch.float32).train()
    params = dict(model.named_parameters())
    want_rewards, want_grads = [], []
    for batch in batches:
        rewards = sequence_rewards(model, batch, BETA)
        want_rewards.append(rewards.detach())
        want_grads.append(torch.autograd.grad(rewards.square().sum(), list(params.values())))
    mean_grads = {name: (a + b) / 2 for name, a, b in zip(params, *want_grads, strict=True)}

    for rank in range(2):
        got = torch.load(tmp_path / str(rank))
        assert got["full_forwards"] == 0 and got["kept"]
        assert torch.allclose(got["rewards"], want_rewards[rank], atol=1e-5)
        assert got["grads"].keys() == mean_grads.keys()
        for name, grad in got["grads"].items():
            assert torch.allclose(grad, mean_grads[name], atol=1e-5, rtol=1e-4), (name, rank)
