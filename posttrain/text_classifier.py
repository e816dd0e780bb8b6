"""A local Hugging Face text-classification model as a data filter: checked and loaded safely, then
scoring (prompt, answer) pairs in batches.

Loading follows models.py's rules: a local directory, safetensors weights only, no remote code. Every
problem a user can fix (not a classifier, pickle-only weights, a label the model does not have) is a
ConfigError naming the config key and the directory, raised when the classifier is built, which the
filter stage does in setup, before it reads a row.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch

from .config import ConfigError
from .models import check_model_dir, load_model


class TextClassifier:
    """Scores rows with a sequence-classification model: the probability of its unsafe labels.

    `key` is the config section the settings come from (e.g. 'filter.unsafe'); errors name
    `<key>.classifier_model` or `<key>.unsafe_labels` and the directory.
    """

    def __init__(
        self,
        model_dir: str | Path,
        unsafe_labels: Sequence[str],
        key: str = "filter.unsafe",
        batch_size: int = 32,
        max_length: int = 512,
        device: torch.device | str = "cpu",
    ):
        from transformers import AutoConfig, AutoTokenizer

        self.dir, where = Path(model_dir), f"{key}.classifier_model"
        try:
            check_model_dir(self.dir)
            config = AutoConfig.from_pretrained(str(self.dir), trust_remote_code=False)
        except Exception as err:  # missing dir, no config.json, pickle-only weights, remote-code config
            raise ConfigError(f"{where}: {model_dir}: cannot be used as a classifier: {err}") from err
        archs = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ConfigError(
                f"{where}: {model_dir} is not a text-classification model: its config.json "
                f"names architectures {archs}, expected a *ForSequenceClassification one"
            )
        labels = {str(name): int(i) for i, name in config.id2label.items()}
        missing = [lab for lab in unsafe_labels if lab not in labels]
        if missing:
            raise ConfigError(
                f"{key}.unsafe_labels: {missing} not among the labels of {model_dir} "
                f"(its config.json id2label: {dict(sorted(config.id2label.items()))})"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir), trust_remote_code=False)
            self.model = load_model(self.dir, device=device, kind="classifier")
        except Exception as err:
            raise ConfigError(f"{where}: loading {model_dir} failed: {type(err).__name__}: {err}") from err
        self._pad_setup()
        self.unsafe_ids = [labels[lab] for lab in unsafe_labels]
        self.unsafe_labels = list(unsafe_labels)
        self.multi_label = config.problem_type == "multi_label_classification"
        positions = getattr(config, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if positions else max_length
        self.batch_size = batch_size
        self.device = torch.device(device)  # the filter stage's device (dist.rank's rule)
        self.model.eval()
        self.inputs = set(inspect.signature(self.model.forward).parameters)  # e.g. Llama takes no token_type_ids

    def _pad_setup(self) -> None:
        """Batches need a pad token, and decoder classifiers read the last non-pad position by its id."""
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        if self.model.config.pad_token_id is None and tok.pad_token_id is not None:
            self.model.config.pad_token_id = tok.pad_token_id

    def settings(self) -> dict:
        """What the report shows about this classifier."""
        return {
            "model": str(self.dir),
            "architecture": type(self.model).__name__,
            "unsafe_labels": self.unsafe_labels,
            "input": "prompt and answer as a text pair",
            "score": "max sigmoid of unsafe_labels" if self.multi_label else "sum of softmax of unsafe_labels",
            "device": str(self.device),
            "batch_size": self.batch_size,
            "max_length": self.max_length,
        }

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """The unsafe score of each (prompt, answer) pair, in [0, 1]."""
        # similar lengths share a batch: less padding, the same scores
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
        scores = [0.0] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [prompts[i] for i in idx],
                [answers[i] for i in idx],
                truncation="longest_first",
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k in self.inputs}
            logits = self.model(**enc).logits.float()
            probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
            unsafe = probs[:, self.unsafe_ids]
            values = (unsafe.max(-1).values if self.multi_label else unsafe.sum(-1)).tolist()
            for i, v in zip(idx, values):
                scores[i] = v
        return scores
