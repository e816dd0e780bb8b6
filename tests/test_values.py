"""PPO's per-token values (`rollout.token_values`) computed the lean way: response positions only, in
length groups, prompts shared, equal to the value model run over each whole row."""

import pytest
import torch

from posttrain.models import ModelConfig, attention_implementation, tiny_config
from posttrain.rollout import token_values
from posttrain.stages.ppo.value import ValueModel

from .conftest import TINY
from .test_devices import CPU_AND_CUDA
from .test_lean_logprobs import _varied_batch


def _value_model(family: str, tokenizer):
    """A tiny value model as `load_value_model` gives: a sequence classifier with one label, or our
    ValueModel around RecurrentGemma's backbone; its head random (a fresh one is zero)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(3)
    config = tiny_config(ModelConfig(family=family, **TINY), tokenizer)
    if family == "recurrent_gemma":
        model = ValueModel(AutoModel.from_config(config), config.hidden_size)
    else:
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(
            config, attn_implementation=attention_implementation(config.model_type)
        )
    torch.nn.init.normal_(model.score.weight)
    return model.train()


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("family", ["llama", "gemma2", "recurrent_gemma"])
def test_token_values_equal_the_whole_rows_with_fewer_positions(tiny_tokenizer, family, device, monkeypatch):
    """Values at response tokens and every parameter's gradient equal those of the backbone run over each
    whole padded row (the state before token t is position t-1), zero outside the responses; the backbone
    runs fewer positions (groups by length; Llama and Gemma 2 also share each group's prompts)."""
    from posttrain import rollout

    monkeypatch.setattr(rollout, "GROUP_MIN_POSITIONS", 0)  # tiny rows: take any split that saves positions
    model = _value_model(family, tiny_tokenizer).to(device)
    batch = _varied_batch(len(tiny_tokenizer)).to(device)
    assert rollout.length_groups(model.base_model, rollout.row_lengths(batch)) is not None
    weights = torch.randn(batch.input_ids.shape).to(device)
    positions = []
    model.base_model.register_forward_pre_hook(
        lambda _, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True
    )

    def whole_rows():
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        values = torch.nn.functional.pad(model.score(hidden).squeeze(-1)[:, :-1], (1, 0))
        return values * batch.response_mask

    results = {}
    for name, values_of in (("lean", lambda: token_values(model, batch)), ("whole", whole_rows)):
        positions.clear()
        values = values_of()
        grads = torch.autograd.grad((values * weights).sum(), list(model.parameters()))
        results[name] = values, grads, sum(positions)
    (lean, lean_grads, lean_positions), (whole, whole_grads, whole_positions) = results.values()
    assert lean_positions < 0.7 * whole_positions, (lean_positions, whole_positions)
    assert (lean[batch.response_mask == 0] == 0).all() and lean.abs().sum() > 0
    assert torch.allclose(lean, whole, atol=1e-5)
    for got, want in zip(lean_grads, whole_grads, strict=True):
        scale = float(want.abs().max())  # some of these gradients run to hundreds: fp32 rounding scales with them
        assert torch.allclose(got, want, atol=1e-6 * scale, rtol=1e-4), ((got - want).abs().max(), scale)
