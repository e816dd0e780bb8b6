"""Gemma 2's grouped eager attention (`posttrain/attention.py`) against transformers' eager attention."""

import json

import pytest
import torch

from posttrain.attention import GROUPED_EAGER
from posttrain.models import ModelConfig, build_tiny_model, load_model, save_model_dir

from .test_devices import gpu

GQA = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)


def _gemma2(tokenizer, sliding_window: int = 4096):
    return build_tiny_model(ModelConfig(family="gemma2", sliding_window=sliding_window, **GQA), tokenizer, seed=3)


def _pair(tokenizer, sliding_window: int):
    ours, eager = _gemma2(tokenizer, sliding_window), _gemma2(tokenizer, sliding_window)
    eager.set_attn_implementation("eager")
    return ours, eager


@pytest.mark.parametrize("sliding_window", [4096, 6])
def test_grouped_eager_equals_eager_logits_and_gradients(tiny_tokenizer, sliding_window):
    """Two query heads per key/value head, left padding, soft-capping, and a sliding window shorter than the
    sequences (6 of 14 positions): logits and every parameter's gradient equal eager's to fp32 rounding."""
    ours, eager = _pair(tiny_tokenizer, sliding_window)
    assert ours.config._attn_implementation == GROUPED_EAGER and eager.config._attn_implementation == "eager"
    torch.manual_seed(0)
    ids = torch.randint(5, len(tiny_tokenizer), (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, :2] = 0
    outs = []
    for model in (ours, eager):
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()].logsumexp(-1) ** 2).mean().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ours_logits, ours_grads), (eager_logits, eager_grads) = outs
    valid = mask.bool()
    assert torch.allclose(ours_logits[valid], eager_logits[valid], atol=1e-5, rtol=1e-5)
    assert (ours_logits[valid] - eager_logits[valid]).abs().max() < 1e-4
    for name, grad in eager_grads.items():
        assert torch.allclose(ours_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_grouped_eager_decoding_with_cache_equals_the_full_forward(tiny_tokenizer):
    """Decoding one token at a time from the key/value cache (the shape generation runs) gives the logits of
    the whole sequence's forward pass."""
    ours = _gemma2(tiny_tokenizer)
    ids = torch.randint(5, len(tiny_tokenizer), (2, 9))
    with torch.no_grad():
        full = ours(input_ids=ids).logits
        out = ours(input_ids=ids[:, :5], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(5, 9):
            out = ours(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 4:8], atol=1e-5)


def test_saved_gemma2_config_keeps_no_posttrain_attention(tiny_tokenizer, tmp_path):
    """The registration is process-local: a saved model's config.json does not name it, and the directory
    loads back with it through `load_model`."""
    model = _gemma2(tiny_tokenizer)
    save_model_dir(model, tiny_tokenizer, tmp_path / "m")
    assert GROUPED_EAGER not in (tmp_path / "m" / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "m" / "config.json").read_text())
    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.config._attn_implementation == GROUPED_EAGER


@gpu
def test_grouped_eager_on_cuda_is_as_accurate_as_eager_in_bf16(tiny_tokenizer):
    """On CUDA: in fp32 the logits equal eager's (no TF32 in matmuls by default), and under bf16 autocast
    (the RL stage's mixed precision) they are as close to the fp32 logits as eager's are."""
    cuda = torch.device("cuda:0")
    ours, eager = (m.to(cuda) for m in _pair(tiny_tokenizer, 6))
    torch.manual_seed(0)
    ids = torch.randint(5, len(tiny_tokenizer), (3, 14), device=cuda)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    valid = mask.bool()
    with torch.no_grad():
        exact = eager(input_ids=ids, attention_mask=mask).logits[valid]
        assert torch.allclose(ours(input_ids=ids, attention_mask=mask).logits[valid], exact, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            errors = [
                (m(input_ids=ids, attention_mask=mask).logits[valid].float() - exact).abs().max() for m in (ours, eager)
            ]
    assert errors[0] <= 1.5 * errors[1] + 1e-3, errors
