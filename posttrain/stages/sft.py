"""sft: supervised fine-tuning on conversational JSONL with TRL's SFTTrainer.

Loss on assistant turns only (TRL's assistant-only masking of the Gemma template), packing on or off,
full fine-tuning or LoRA (saved as an adapter or merged into the weights). Runs in one process or as
DeepSpeed ranks through the launcher. Resumes from its last checkpoint after a crash.

Output in run_dir/sft/: model/ (a complete HF model directory), metrics.json, loss.png.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..checkpoint import train_from_last_checkpoint
from ..config import ModelDir, LoraSection, TrainerSection
from ..data import DataSource, read_rows
from ..manifest import atomic_write_json
from ..models import load_model, load_tokenizer
from ..plots import curves_from_log_history, plot_curves
from .base import Stage
from .trainer_common import (
    finish_trainer_stage,
    greedy_accuracy,
    keep_fitting,
    load_saved,
    save_trained_model,
    training_arguments,
)


class LoraConfig(LoraSection):
    """Low-rank adaptation (peft) of the SFT model."""

    save: Literal["merged", "adapter"] = "merged"
    """Save the adapter merged into full weights, or the adapter alone (with a pointer to its base)."""


class SFTConfig(TrainerSection):
    """Config of the sft stage."""

    model: ModelDir = None
    """Model directory to fine-tune; default: the latest earlier stage's model."""
    train_data: DataSource = None
    """Conversations to train on (a path, a source mapping or a mixture); default: the latest data stage's output."""
    eval_data: DataSource = None
    """Held-out conversations (path, mapping or mixture); default: the data stage's held-out split."""
    packing: bool = False
    """Pack several conversations into each sequence (TRL best-fit packing)."""
    assistant_only_loss: bool = True
    """Train on assistant tokens only (user turns are context, not targets)."""
    lora: LoraConfig = LoraConfig()
    """LoRA settings."""
    eval_samples: int = Field(100, ge=0)
    """Held-out prompts answered greedily before and after training for task accuracy (0 = skip; rows without
    an `answer` column are not counted)."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest greedy answer in the accuracy check."""


class SFT(Stage):
    name = "sft"
    Config = SFTConfig
    consumes = {"model": "model", "train_data": "train_data", "eval_data": "eval_data"}
    optional_inputs = {"eval_data"}
    produces = {"model": "model"}
    trains = True

    def setup(self) -> None:
        from datasets import Dataset

        inp = self.ctx.inputs
        self.tokenizer = load_tokenizer(inp["model"])
        self.model = load_model(inp["model"], device=self.ctx.device, dtype=torch.float32)  # fp32 master weights
        self.train_rows = read_rows(inp["train_data"], seed=self.ctx.seed)
        self.eval_rows = read_rows(inp["eval_data"], seed=self.ctx.seed) if inp.get("eval_data") else []
        train, self.too_long = self._fitting(self.train_rows, "training conversations")
        held_out, self.eval_too_long = self._fitting(self.eval_rows, "held-out conversations")
        self.train_ds = Dataset.from_list([{"messages": r["messages"]} for r in train])
        self.eval_ds = Dataset.from_list([{"messages": r["messages"]} for r in held_out]) if held_out else None
        # the greedy accuracy check compares with an oracle answer: only rows that carry one (own data may not)
        self.answer_rows = [r for r in self.eval_rows if r.get("answer") is not None]

    def _fitting(self, rows: list[dict], what: str) -> tuple[list[dict], int]:
        """The rows whose conversation, as the chat template renders it, fits max_length (`keep_fitting`)."""
        if not rows:
            return [], 0
        texts = self.tokenizer.apply_chat_template([r["messages"] for r in rows], tokenize=False)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return keep_fitting(rows, lengths, self.cfg.max_length, self.ctx.name, what)

    def _trainer(self):
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer

        c, ctx = self.cfg, self.ctx
        has_eval = self.eval_ds is not None
        args = TRLConfig(
            **training_arguments(
                c,
                ctx.dir / "checkpoints",
                ctx.seed,
                ctx.device,
                ctx.precision,
                has_eval,
                report_to=ctx.report_to,
                stage_dir=ctx.dir,
                max_length=c.max_length,
                packing=c.packing,
                assistant_only_loss=c.assistant_only_loss,
                eval_on_start=has_eval,
            )
        )
        return SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            processing_class=self.tokenizer,
            peft_config=c.lora.peft_config("CAUSAL_LM"),
        )

    def train(self) -> dict:
        metrics = {"train_rows": len(self.train_ds), "train_rows_too_long": self.too_long}
        if self.eval_too_long:
            metrics["eval_rows_too_long"] = self.eval_too_long
        if self.ctx.is_main and self.cfg.eval_samples and self.answer_rows:
            metrics["accuracy_before"] = self._accuracy(self.model)
        self.trainer = self._trainer()
        metrics.update(train_from_last_checkpoint(self.trainer, self.ctx.dir / "checkpoints", self.log, self.ctx.name))
        evals = [e["eval_loss"] for e in self.trainer.state.log_history if "eval_loss" in e]
        if evals:
            metrics["eval_loss_before"] = round(evals[0], 4)
            metrics["eval_loss_after"] = round(self.trainer.evaluate()["eval_loss"], 4)
        return metrics

    def save(self) -> dict:
        """Write model/ atomically; then (rank 0) reload it for the accuracy-after check."""
        c, ctx = self.cfg, self.ctx
        merged = c.lora.enabled and c.lora.save == "merged"  # not under ZeRO-3: refused by the config
        final = save_trained_model(ctx, self.trainer, self.tokenizer, ctx.precision, merge_lora=merged)
        metrics = {}
        if ctx.is_main:
            history = self.trainer.state.log_history
            plot_curves(
                curves_from_log_history(history, ["loss", "eval_loss", "learning_rate"]),
                ctx.dir / "loss.png",
                title="SFT",
            )
            if c.eval_samples and self.answer_rows:  # an adapter dir loads onto its base, as eval and release load it
                metrics["accuracy_after"] = self._accuracy(load_saved(final, ctx))
            metrics["device"], metrics["precision"] = str(ctx.device), ctx.precision
            atomic_write_json(ctx.dir / "metrics.json", {"log_history": history, **metrics})
        finish_trainer_stage(ctx, self.trainer, c.keep_checkpoints)
        return metrics

    def _accuracy(self, model) -> dict:
        return greedy_accuracy(
            model, self.tokenizer, self.answer_rows, self.cfg.eval_samples, self.cfg.max_new_tokens, self.ctx.precision
        )


STAGE = SFT
