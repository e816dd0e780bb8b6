"""SFT: the held-out loss falls, greedy answers get more often right, LoRA changes only adapters."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.pipeline import load_pipeline, run_pipeline

from .conftest import TINY, write_pipeline

RECIPE = "name: easy\ntasks:\n  - task: sort\n    params: {min_len: 3, max_len: 3}\n  - task: safety\n  - task: count\n"


def _pipeline(tmp_path, sft: dict) -> str:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    sft = {
        "learning_rate": 3e-3,
        "epochs": 4,
        "batch_size": 16,
        "max_length": 64,
        "eval_steps": 40,
        "eval_samples": 60,
        "max_new_tokens": 12,
        **sft,
    }
    body = (
        f"seed: 0\nstages: [synth, base, sft]\n"
        f"synth: {{recipe: {tmp_path / 'recipe.yaml'}, num_train: 600, num_eval: 60}}\n"
        f"base: {json.dumps({**TINY, 'family': 'gemma2'})}\nsft: {json.dumps(sft)}\n"
    )
    return write_pipeline(tmp_path, body)


def test_sft_loss_falls_and_accuracy_rises(tmp_path):
    # 8 epochs: accuracy 0.83 / 0.75 / 0.77 for pipeline seeds 0 / 1 / 2 (at 4 epochs, 0.12-0.27: too close to call)
    summary = run_pipeline(load_pipeline(_pipeline(tmp_path, {"epochs": 8})))
    m = summary["sft"]
    assert m["eval_loss_after"] < 0.5 * m["eval_loss_before"], m
    assert m["accuracy_before"]["overall"] < 0.05
    assert m["accuracy_after"]["overall"] >= m["accuracy_before"]["overall"] + 0.5, m
    out = tmp_path / "run" / "sft"
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "model" / "model.safetensors").is_file() and not (out / "model" / "training_args.bin").exists()
    assert not (out / "checkpoints").exists()  # removed once the stage is complete
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0]


def test_assistant_only_loss_masks_the_prompt(tmp_path, tiny_tokenizer):
    """TRL's assistant-only labels cover exactly the model turn's content and its end-of-turn token."""
    from trl import SFTConfig, SFTTrainer
    from datasets import Dataset
    from posttrain.models import ModelConfig, build_tiny_model

    model = build_tiny_model(ModelConfig(family="llama", **TINY), tiny_tokenizer)
    conv = [{"role": "user", "content": "Sort these numbers: 3, 1"}, {"role": "assistant", "content": "1, 3"}]
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to="none", use_cpu=True)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list([{"messages": conv}]), processing_class=tiny_tokenizer
    )
    row = trainer.train_dataset[0]
    kept = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tiny_tokenizer.decode(kept) == "1, 3<end_of_turn>\n"


@pytest.mark.parametrize("save", ["adapter", "merged"])
def test_lora_changes_only_adapter_weights(tmp_path, save):
    path = _pipeline(
        tmp_path,
        {
            "lora": {"enabled": True, "r": 8, "alpha": 16, "save": save},
            "epochs": 1,
            "learning_rate": 1e-2,
            "eval_samples": 4,
        },
    )
    summary = run_pipeline(load_pipeline(path))
    assert summary["sft"]["accuracy_after"]["n"] == 4  # the saved model (an adapter: onto its base) answers
    base = load_file(tmp_path / "run" / "base" / "model" / "model.safetensors")
    out = tmp_path / "run" / "sft" / "model"
    if save == "adapter":
        adapter = load_file(out / "adapter_model.safetensors")
        assert adapter and all("lora_" in k for k in adapter)
        assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
        assert not (out / "model.safetensors").exists()
        from posttrain.models import load_model  # the adapter dir loads onto its base

        assert load_model(out, device="cpu") is not None
    else:
        merged = load_file(out / "model.safetensors")
        assert merged.keys() == base.keys()
        changed = {k for k in base if not torch.equal(base[k], merged[k])}
        assert changed and all("proj" in k for k in changed), changed  # linear layers only
        assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


def test_packing_trains(tmp_path):
    summary = run_pipeline(load_pipeline(_pipeline(tmp_path, {"packing": True, "eval_samples": 0, "epochs": 3})))
    assert summary["sft"]["eval_loss_after"] < 0.6 * summary["sft"]["eval_loss_before"]
