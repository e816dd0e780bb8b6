"""The Gemma chat format, the local tokenizer, and the tiny-model factory for each seed family."""

import json

import pytest
import torch

from posttrain.chat import CONTROL_TOKENS, END_OF_TURN, render
from posttrain.models import ModelConfig, build_tiny_model, load_model, load_tokenizer, save_model_dir, stop_token_ids

from .conftest import TINY

CONVERSATION = [
    {"role": "user", "content": "Reverse the list: a, b"},
    {"role": "assistant", "content": "b, a"},
    {"role": "user", "content": "  And sort 3, 1?  "},
    {"role": "assistant", "content": "1, 3"},
]
# Written out by hand from the Gemma model card's format (content is stripped by the template).
EXPECTED = (
    "<bos><start_of_turn>user\nReverse the list: a, b<end_of_turn>\n"
    "<start_of_turn>model\nb, a<end_of_turn>\n"
    "<start_of_turn>user\nAnd sort 3, 1?<end_of_turn>\n"
    "<start_of_turn>model\n1, 3<end_of_turn>\n"
)


def test_chat_template_renders_gemma_format_exactly(tiny_tokenizer):
    assert tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED
    assert render(CONVERSATION) == EXPECTED
    prompt = tiny_tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED.rsplit("<start_of_turn>model", 1)[0] + "<start_of_turn>model\n"


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}], "System role not supported"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ],
)
def test_template_rejects_system_and_non_alternating(tiny_tokenizer, messages, error):
    with pytest.raises(Exception, match=error):
        tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError):
        render(messages)


def test_control_tokens_are_single_tokens_and_stop_ids(tiny_tokenizer):
    for i, tok in enumerate(CONTROL_TOKENS):
        assert tiny_tokenizer.convert_tokens_to_ids(tok) == i
        assert tiny_tokenizer(tok, add_special_tokens=False)["input_ids"] == [i]
    assert stop_token_ids(tiny_tokenizer) == [
        tiny_tokenizer.eos_token_id,
        tiny_tokenizer.convert_tokens_to_ids(END_OF_TURN),
    ]
    # digits are split one per token (what lets small models do arithmetic)
    pieces = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer("1234", add_special_tokens=False)["input_ids"])
    assert pieces == ["1", "2", "3", "4"]


@pytest.mark.parametrize("family", ["gemma", "gemma2", "recurrent_gemma", "llama"])
def test_tiny_family_builds_saves_and_reloads(tmp_path, tiny_tokenizer, family):
    cfg = ModelConfig(family=family, **{**TINY, "num_layers": 3 if family == "recurrent_gemma" else 2})
    model = build_tiny_model(cfg, tiny_tokenizer, seed=1)
    out = save_model_dir(model, tiny_tokenizer, tmp_path / family)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == stop_token_ids(tiny_tokenizer)
    reloaded, tok = load_model(out, device="cpu"), load_tokenizer(out)
    assert tok.chat_template == tiny_tokenizer.chat_template
    ids = torch.tensor([tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]])
    torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)
    if family == "gemma2":
        c = reloaded.config
        assert c.final_logit_softcapping == 30.0 and c.attn_logit_softcapping == 50.0
        assert c.layer_types == ["sliding_attention", "full_attention"]


def test_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({}, bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights .*pytorch_model.bin.*never loaded"):
        load_model(bad, device="cpu")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(tmp_path / "missing", device="cpu")
