"""LoRA for our own training loops: the folded weights equal peft's merge, and PPO with LoRA trains only
the adapters, keeps the base as its reference and serves the folded weights to the rollout engine."""

import copy
import json

import torch

from posttrain.config import LoraSection
from posttrain.data import prompt_of
from posttrain.lora import add_adapters, lora_scalings, merged_state_dict, unwrap
from posttrain.models import load_model
from posttrain.pipeline import load_pipeline
from posttrain.rollout import pack_rollout, token_logprobs, token_values
from posttrain.stages import StageContext
from posttrain.stages.ppo import PPO

from .test_ppo import _setup

LORA = LoraSection(enabled=True, r=4, alpha=8)


def _randomise_adapters(model) -> None:
    """peft starts B at zero (an identity fold); give every adapter weight a value so the fold is tested."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_folded_weights_equal_peft_merge_for_policy_and_value(tiny_model_dir):
    for kind, task in (("causal_lm", "CAUSAL_LM"), ("reward", "SEQ_CLS")):
        model = add_adapters(load_model(tiny_model_dir, kind=kind, device="cpu"), LORA, task)
        _randomise_adapters(model)
        if task == "SEQ_CLS":  # the full-trained head copy replaces the original
            with torch.no_grad():
                unwrap(model).score.modules_to_save["default"].weight.add_(1.0)
        ours = merged_state_dict(model.state_dict(), lora_scalings(model))
        reference = copy.deepcopy(model).merge_and_unload().state_dict()
        assert ours.keys() == reference.keys()
        for key, tensor in reference.items():
            torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
        base = load_model(tiny_model_dir, kind=kind, device="cpu").state_dict()
        assert any(not torch.equal(ours[k], v) for k, v in base.items())


def test_ppo_with_lora_trains_adapters_keeps_base_as_reference_and_syncs_rollout_copy(tmp_path, tiny_model_dir):
    lora = {"enabled": True, "r": 4, "alpha": 8}
    cfg = load_pipeline(_setup(tmp_path, tiny_model_dir, ppo={"lora": lora, "value_lora": lora, "eval_samples": 0}))
    inputs = {k: getattr(cfg.ppo, k) for k in ("model", "train_data", "eval_data")}
    stage = PPO(cfg.ppo, StageContext(name="ppo", dir=tmp_path / "dbg", inputs=inputs, seed=0, pipeline=cfg))
    stage.ctx.dir.mkdir()
    stage.setup()
    assert stage.reference is None and stage.rollout_model is not stage.policy
    base_before = {k: v.clone() for k, v in stage.policy.state_dict().items()}
    value_before = {k: v.clone() for k, v in stage.value.state_dict().items()}
    for update in range(2):
        stage.history.append(stats := stage._update(update))
    assert stats["kl"] != 0.0  # the adapters moved the policy away from the adapter-free base
    changed = {k for k, v in stage.policy.state_dict().items() if not torch.equal(v, base_before[k])}
    assert changed and all("lora_" in k for k in changed)  # the base weights are frozen
    value_changed = {k for k, v in stage.value.state_dict().items() if not torch.equal(v, value_before[k])}
    assert any("lora_" in k for k in value_changed) and any("modules_to_save" in k for k in value_changed)

    # the rollout copy samples from the folded weights: same logprobs as the adapted policy
    idx = stage._next_prompts()[:8]
    samples = [s[0] for s in stage.engine.generate([prompt_of(stage.rows[i]) for i in idx], cfg.ppo.sampling)]
    batch = pack_rollout([stage.prompt_ids[i] for i in idx], samples, stage.tokenizer.pad_token_id)
    stage.policy.eval()
    with torch.no_grad():
        served, trained = token_logprobs(stage.rollout_model, batch), token_logprobs(stage.policy, batch)
        with stage.policy.disable_adapter():
            base = token_logprobs(stage.policy, batch)
        assert token_values(stage.value, batch).shape == batch.input_ids.shape
    mask = batch.response_mask.bool()
    torch.testing.assert_close(served[mask], trained[mask], rtol=1e-4, atol=1e-4)
    assert (served[mask] - base[mask]).abs().max() > 1e-3

    metrics = stage.save()
    saved = load_model(stage.ctx.dir / "model", device="cpu")  # a plain model, adapters folded in
    assert not any("lora_" in k for k in saved.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(saved, batch)[mask], trained[mask], rtol=1e-4, atol=1e-4)
    assert json.loads((stage.ctx.dir / "summary.json").read_text())["history"] and "time_breakdown_s" in metrics
