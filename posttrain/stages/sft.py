"""sft: supervised fine-tuning on conversational JSONL with TRL's SFTTrainer.

Loss on assistant turns only (TRL's assistant-only masking of the Gemma template), packing on or off,
full fine-tuning or LoRA (saved as an adapter or merged into the weights). Runs in one process or as
DeepSpeed ranks through the launcher. Resumes from its last checkpoint after a crash.

Output in run_dir/sft/: model/ (a complete HF model directory), metrics.json, loss.png.
"""
from __future__ import annotations

import shutil
from typing import Literal

from pydantic import Field

from ..checkpoint import train_from_last_checkpoint
from ..config import InputPath, LoraSection, TrainerSection
from ..data import DataSource, read_rows
from ..manifest import atomic_write_json
from ..plots import curves_from_log_history, plot_curves
from .base import Stage


class LoraConfig(LoraSection):
    """Low-rank adaptation (peft) of the SFT model."""

    save: Literal["merged", "adapter"] = "merged"
    """Save the adapter merged into full weights, or the adapter alone (with a pointer to its base)."""


class SFTConfig(TrainerSection):
    """Config of the sft stage."""

    model: InputPath = None
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
    """Held-out prompts answered greedily before and after training for task accuracy (0 = skip)."""
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

        from ..models import load_model, load_tokenizer

        inp = self.ctx.inputs
        self.tokenizer = load_tokenizer(inp["model"])
        self.model = load_model(inp["model"])
        self.train_rows = read_rows(inp["train_data"], seed=self.ctx.seed)
        self.eval_rows = read_rows(inp["eval_data"], seed=self.ctx.seed) if inp.get("eval_data") else []
        self.train_ds = Dataset.from_list([{"messages": r["messages"]} for r in self.train_rows])
        self.eval_ds = Dataset.from_list([{"messages": r["messages"]} for r in self.eval_rows]) if self.eval_rows else None

    def _trainer(self):
        from trl import SFTConfig as TRLConfig
        from trl import SFTTrainer

        from ..launch import trainer_kwargs

        c = self.cfg
        args = TRLConfig(
            output_dir=str(self.ctx.dir / "checkpoints"), learning_rate=c.learning_rate, num_train_epochs=c.epochs,
            max_steps=c.max_steps, per_device_train_batch_size=c.batch_size, per_device_eval_batch_size=c.batch_size,
            gradient_accumulation_steps=c.grad_accum, warmup_steps=c.warmup, lr_scheduler_type=c.scheduler,
            weight_decay=c.weight_decay, max_length=c.max_length, packing=c.packing,
            gradient_checkpointing=c.gradient_checkpointing,
            assistant_only_loss=c.assistant_only_loss, logging_steps=c.logging_steps, logging_first_step=True,
            eval_strategy="steps" if self.eval_ds is not None else "no", eval_steps=c.eval_steps, eval_on_start=self.eval_ds is not None,
            save_strategy="steps", save_steps=c.save_steps, save_total_limit=2, report_to="none",
            seed=self.ctx.seed, data_seed=self.ctx.seed, dataloader_num_workers=0, bf16=False,
            **trainer_kwargs(c.distributed),
        )
        return SFTTrainer(model=self.model, args=args, train_dataset=self.train_ds, eval_dataset=self.eval_ds,
                          processing_class=self.tokenizer, peft_config=c.lora.peft_config("CAUSAL_LM"))

    def train(self) -> dict:
        metrics = {}
        if self.ctx.is_main and self.cfg.eval_samples and self.eval_rows:
            metrics["accuracy_before"] = self._accuracy(self.model)
        self.trainer = self._trainer()
        metrics.update(train_from_last_checkpoint(self.trainer, self.ctx.dir / "checkpoints", self.log, "sft"))
        evals = [e["eval_loss"] for e in self.trainer.state.log_history if "eval_loss" in e]
        if evals:
            metrics["eval_loss_before"] = round(evals[0], 4)
            metrics["eval_loss_after"] = round(self.trainer.evaluate()["eval_loss"], 4)
        return metrics

    def save(self) -> dict:
        """Write model/ atomically; then (rank 0) reload it for the accuracy-after check."""
        from ..models import start_model_dir

        final, partial = start_model_dir(self.ctx.dir, self.trainer, self.ctx.is_main)
        model_to_save = self.trainer.model
        if self.cfg.lora.enabled and self.cfg.lora.save == "merged":
            if self.cfg.distributed.num_processes > 1 and self.cfg.distributed.zero_stage == 3:
                raise ValueError("sft.lora.save=merged is not supported under ZeRO-3; use zero_stage 2 or lora.save=adapter")
            model_to_save = self.trainer.accelerator.unwrap_model(model_to_save).merge_and_unload()
            if self.ctx.is_main:
                model_to_save.save_pretrained(partial, safe_serialization=True)
        else:
            self.trainer.save_model(str(partial))  # gathers ZeRO-3 shards on every rank
        metrics = {}
        if self.ctx.is_main:
            from ..models import finish_model_dir

            finish_model_dir(partial, final, self.tokenizer)
            history = self.trainer.state.log_history
            plot_curves(curves_from_log_history(history, ["loss", "eval_loss", "learning_rate"]),
                        self.ctx.dir / "loss.png", title="SFT")
            if self.cfg.eval_samples and self.eval_rows and not (self.cfg.lora.enabled and self.cfg.lora.save == "adapter"):
                from ..launch import end_sharded_init
                from ..models import load_model

                end_sharded_init()
                metrics["accuracy_after"] = self._accuracy(load_model(final))
            atomic_write_json(self.ctx.dir / "metrics.json", {"log_history": history, **metrics})
            if not self.cfg.keep_checkpoints:
                shutil.rmtree(self.ctx.dir / "checkpoints", ignore_errors=True)
        self.trainer.accelerator.wait_for_everyone()
        return metrics

    def _accuracy(self, model) -> dict:
        """Greedy answers to held-out prompts against their oracle answers."""
        from ..generate import greedy_texts
        from ..tasks import answer_accuracy

        rows = self.eval_rows[: self.cfg.eval_samples]
        prompts = [r["messages"][:-1] for r in rows]
        return answer_accuracy(rows, greedy_texts(model, self.tokenizer, prompts, self.cfg.max_new_tokens))


STAGE = SFT
