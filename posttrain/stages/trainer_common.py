"""What the stages built on a (TRL) Trainer share — sft, rm, distill, dpo: the TrainingArguments taken
from a TrainerSection and the stage's device and precision, the save sequence that turns the Trainer's
output into a complete model directory, the greedy task-accuracy check, and the rule for examples longer
than max_length.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import torch

from ..config import TrainerSection
from ..dist.rank import torch_dtype
from ..dist.trainable import end_sharded_init, trainer_kwargs
from ..engines import greedy_texts
from ..models import finish_model_dir, load_model, start_model_dir
from ..pairs import tokenize_pairs
from ..tasks import answer_accuracy
from ..tracking import trainer_settings


T = TypeVar("T")


def keep_fitting(items: list[T], lengths: Sequence[int], max_length: int, key: str, what: str) -> tuple[list[T], int]:
    """The items whose token length is at most `max_length`, and how many were longer.

    Longer ones are left out, not truncated: a cut conversation ends mid-answer without its end-of-turn
    token, and trains the model to stop there. The count is logged (and the stages report it); when no
    training item fits, the error names the setting `key.max_length` and the shortest item's length."""
    kept = [item for item, n in zip(items, lengths, strict=True) if n <= max_length]
    too_long = len(items) - len(kept)
    if items and not kept and what.startswith("training"):
        raise ValueError(
            f"{key}.max_length={max_length}: none of the {len(items)} {what} fits (the shortest has "
            f"{min(lengths)} tokens); raise it"
        )
    if too_long:
        logging.getLogger("posttrain").warning(
            "[%s] %d of %d %s are longer than %s.max_length=%d tokens and are left out (not truncated)",
            key,
            too_long,
            len(items),
            what,
            key,
            max_length,
        )
    return kept, too_long


def fitting_pairs(tokenizer, rows: list[dict], max_length: int, key: str, what: str) -> tuple[list[tuple], int]:
    """(row, TokenizedPair) of the preference pairs whose prompt and longer answer fit `max_length`, and how
    many did not (`keep_fitting`)."""
    pairs = list(zip(rows, tokenize_pairs(tokenizer, rows)))
    return keep_fitting(pairs, [p.length for _, p in pairs], max_length, key, what)


def training_arguments(
    c: TrainerSection,
    output_dir: str | Path,
    seed: int,
    device: torch.device,
    precision: str,
    with_eval: bool,
    *,
    report_to: Sequence[str] = (),
    stage_dir: Optional[Path] = None,
    **extra,
) -> dict:
    """TrainingArguments fields from the stage config, placed on `device` in `precision` (bf16/fp16: mixed
    precision over fp32 master weights), with DeepSpeed under several ranks, reporting to the `report_to`
    trackers (runs named after `stage_dir`). `extra` adds or overrides."""
    args = dict(
        output_dir=str(output_dir),
        learning_rate=c.learning_rate,
        num_train_epochs=c.epochs,
        max_steps=c.max_steps,
        per_device_train_batch_size=c.batch_size,
        per_device_eval_batch_size=c.batch_size,
        gradient_accumulation_steps=c.grad_accum,
        warmup_steps=c.warmup,
        lr_scheduler_type=c.scheduler,
        weight_decay=c.weight_decay,
        gradient_checkpointing=c.gradient_checkpointing,
        logging_steps=c.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if with_eval else "no",
        eval_steps=c.eval_steps,
        save_strategy="steps",
        save_steps=c.save_steps,
        save_total_limit=2,
        report_to="none",
        logging_nan_inf_filter=False,  # transformers would average a NaN loss away; the guard must see it
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        **trainer_kwargs(c.distributed, device, precision),
    )
    args.update(trainer_settings(list(report_to), Path(stage_dir or output_dir)))
    args.update(extra)
    return args


def save_trained_model(
    ctx,
    trainer,
    tokenizer,
    precision: str,
    *,
    merge_lora: bool = False,
    generation: bool = True,
    before_finish: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Write run_dir/<stage>/model atomically from a trained Trainer (every rank calls this): gathered
    ZeRO-3 weights, or LoRA adapters merged into the weights, saved in the precision's dtype, with the
    tokenizer and (for models that generate) a generation config. `before_finish(partial_dir)` adds files
    on rank 0 before the final rename."""
    final, partial = start_model_dir(ctx.dir, trainer, ctx.is_main)
    if merge_lora:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if ctx.is_main:
            merged.save_pretrained(partial, safe_serialization=True)
    else:
        trainer.save_model(str(partial))  # gathers ZeRO-3 shards on every rank
    if ctx.is_main:
        if before_finish is not None:
            before_finish(partial)
        finish_model_dir(partial, final, tokenizer, generation=generation, dtype=torch_dtype(precision))
    return final


def load_saved(final: Path, ctx, kind: str = "causal_lm"):
    """The saved model, loaded back whole on this rank's device for after-training checks (rank 0)."""
    end_sharded_init()
    return load_model(final, device=ctx.device, dtype=torch_dtype(ctx.precision), kind=kind).eval()


def finish_trainer_stage(ctx, trainer, keep_checkpoints: bool) -> None:
    """Drop the resume checkpoints unless asked to keep them (rank 0), then let every rank leave together."""
    if ctx.is_main and not keep_checkpoints:
        shutil.rmtree(ctx.dir / "checkpoints", ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def greedy_accuracy(model, tokenizer, rows: list[dict], limit: int, max_new_tokens: int, precision: str) -> dict:
    """Greedy answers to the first `limit` held-out prompts against their oracle answers."""
    rows = rows[:limit]
    prompts = [r["messages"][:-1] for r in rows]
    return answer_accuracy(rows, greedy_texts(model, tokenizer, prompts, max_new_tokens, precision))
