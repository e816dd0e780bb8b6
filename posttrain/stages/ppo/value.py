"""The value model of PPO with GAE: a reward model (its head kept) or a language model with a new scalar
head, giving one value per token."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...models import load_model


class ValueModel(torch.nn.Module):
    """A backbone with a scalar head, for families transformers has no sequence-classification
    class for (RecurrentGemma). Same attribute names as those classes: `base_model`, `score`."""

    def __init__(self, backbone, hidden_size: int):
        super().__init__()
        self.base_model = backbone
        self.score = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.score.weight)


def load_value_model(path: str, tokenizer, device: torch.device):
    """Per-token value model (fp32 master weights on `device`): a reward model (its head kept) or an LM
    with a new scalar head."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    if model_type == "recurrent_gemma":
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
        return ValueModel(backbone, backbone.config.hidden_size).to(device)
    model = load_model(path, device=device, dtype=torch.float32, kind="reward")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
