"""distill: train a student to match a teacher's next-token distribution (knowledge distillation).

Modes (`distill.mode`):
- offline: the teacher's top-k log-probs at every assistant position of the training set are computed
  once and cached (distill_cache.py); the student trains on forward KL from the teacher's top-k,
  renormalised, to its own full-vocabulary log-probs at those tokens (algos.kd.forward_kl_topk), as in
  Gemma 2's distillation from stored teacher distributions.
- online: the teacher runs beside the student each step; full-vocabulary generalized JSD with `beta`
  (beta 0 = forward KL, 1 = reverse KL; algos.kd.generalized_jsd).
- on_policy: GKD (Agarwal et al. 2024) through TRL's `trl.experimental.gkd.GKDTrainer`: with
  probability `lmbda` a step trains on the student's own samples scored by the teacher (JSD `beta`).
  TRL's GKD loss is the pure JSD at T=1 on the completion tokens: alpha, temperature and top_k do not
  apply (rollout_temperature sets the sampling temperature).
In offline/online mode the loss is alpha * KD + (1 - alpha) * NLL on assistant tokens only (the labels
SFT uses), KD at `temperature` (times T^2 if scale_by_t2). The held-out loss logged during training
is plain next-token NLL, comparable with sft's eval_loss.

Inputs: model (the student; default the latest model), teacher (a model directory: `distill.teacher`,
or the artifact of an earlier stage producing kind "teacher"), train_data, eval_data (optional).
Student and teacher must share one tokenizer. Output in run_dir/distill/: model/, metrics.json,
loss.png, report.md, and (offline, by default) teacher_topk/<key>/.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch.utils.checkpoint import checkpoint

from ..algos.kd import forward_kl_topk, generalized_jsd, mixed_loss
from ..algos.logits import chunk_tokens_for, softcap
from ..checkpoint import train_from_last_checkpoint
from ..config import ConfigError, ModelDir, TrainerSection
from ..data import DataSource, read_rows
from ..dist.rank import torch_dtype
from ..dist.trainable import forward_through
from ..manifest import atomic_write_json, atomic_write_text
from ..models import load_model, load_tokenizer
from ..plots import curves_from_log_history, plot_curves
from ..rollout import hidden_at
from .base import Stage
from .trainer_common import (
    finish_trainer_stage,
    greedy_accuracy,
    keep_fitting,
    load_saved,
    save_trained_model,
    training_arguments,
)


class DistillConfig(TrainerSection):
    """Config of the distill stage."""

    model: ModelDir = None
    """Student model directory; default: the latest earlier stage's model."""
    teacher: ModelDir = None
    """Teacher model directory (required unless an earlier stage produces a 'teacher' artifact)."""
    train_data: DataSource = None
    """Conversations to distill on (a path, a source mapping or a mixture); default: the latest data stage's output."""
    eval_data: DataSource = None
    """Held-out conversations (path, mapping or mixture); default: the data stage's held-out split."""
    mode: Literal["offline", "online", "on_policy"] = "offline"
    """offline: cached teacher top-k; online: teacher forward each step; on_policy: GKD on student samples."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of teacher and student in the KD term (offline/online)."""
    top_k: int = Field(32, ge=1)
    """offline: teacher tokens kept per position (renormalised over these k)."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the KD term; 1 - alpha weights the next-token NLL on the reference answer (offline/online)."""
    beta: float = Field(0.0, ge=0, le=1)
    """online/on_policy: generalized JSD interpolation (0 = forward KL, 1 = reverse KL; TRL's convention)."""
    scale_by_t2: bool = True
    """Multiply the KD term by temperature^2 so its gradients keep their size across temperatures."""
    lmbda: float = Field(0.5, ge=0, le=1)
    """on_policy: probability that a step trains on student-generated answers instead of the data's."""
    seq_kd: bool = False
    """on_policy: on the other steps, train on teacher-generated answers (sequence-level KD)."""
    rollout_temperature: float = Field(1.0, gt=0)
    """on_policy: sampling temperature of the generated answers."""
    rollout_max_new_tokens: int = Field(32, ge=1)
    """on_policy: longest generated answer, in tokens."""
    cache_dir: Optional[str] = None
    """offline: folder of the teacher top-k cache; default <stage dir>/teacher_topk. The runner clears the stage
    dir when the stage config changes: point this elsewhere to reuse the cache across, e.g., learning-rate changes."""
    teacher_batch_size: int = Field(32, ge=1)
    """Sequences per teacher forward when building the cache and measuring held-out KL."""
    eval_samples: int = Field(100, ge=0)
    """Held-out prompts answered greedily before and after training for task accuracy (0 = skip)."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest greedy answer in the accuracy check."""

    @model_validator(mode="after")
    def _settings_of_the_mode(self):
        """A setting only another mode reads is refused, not ignored (when not its default: a stage's full
        config, as the ranks rebuild it from their launch spec, holds every key)."""
        modes = {
            "top_k": ("offline",),
            "cache_dir": ("offline",),
            "beta": ("online", "on_policy"),
            **dict.fromkeys(("lmbda", "seq_kd", "rollout_temperature", "rollout_max_new_tokens"), ("on_policy",)),
        }
        default = {k: field.default for k, field in type(self).model_fields.items()}
        unused = [k for k, used_by in modes.items() if getattr(self, k) != default[k] and self.mode not in used_by]
        if unused:
            raise ValueError(
                f"{', '.join(unused)}: not read in mode {self.mode!r} "
                f"({'; '.join(f'{k}: {chr(47).join(modes[k])}' for k in unused)}); remove them or change mode"
            )
        return self


def distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: DistillConfig,
    teacher_logits: Optional[torch.Tensor] = None,
    topk_indices: Optional[torch.Tensor] = None,
    topk_logprobs: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, nll) on already shifted tensors: student_logits[:, t] predicts labels[:, t].

    Only positions with labels != -100 count. KD is the top-k forward KL when the top-k targets are
    given (offline), else generalized JSD(beta) against the full teacher logits (online).
    """
    mask = labels != -100
    if mask.any():
        nll = torch.nn.functional.cross_entropy(student_logits[mask].float(), labels[mask])
    else:
        nll = student_logits.sum() * 0.0  # keeps the graph when a batch has no target token
    if topk_indices is not None:
        kd = forward_kl_topk(student_logits, topk_indices, topk_logprobs, mask, cfg.temperature, cfg.scale_by_t2)
    elif teacher_logits is not None:
        kd = generalized_jsd(student_logits, teacher_logits, mask, cfg.beta, cfg.temperature, cfg.scale_by_t2)
    else:
        raise ValueError("distill_loss needs either the teacher's logits or its cached top-k targets")
    return mixed_loss(kd, nll, cfg.alpha), kd, nll


def lean_distill_loss(
    student,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    cfg: DistillConfig,
    teacher=None,
    topk_indices: Optional[torch.Tensor] = None,
    topk_logprobs: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`distill_loss` without `[batch, seq, vocab]` logits: the student's (and the online teacher's) output
    heads run on chunks of the loss positions only, each chunk recomputed in the backward pass
    (algos/logits.py). `labels` are shifted (labels[:, t] is the token predicted at position t)."""
    where = labels != -100
    n = int(where.sum())
    hidden, head, cap, vocab = hidden_at(student, input_ids, attention_mask, where)
    if n == 0:
        zero = hidden.sum() * 0.0  # keeps the graph when a batch has no target token
        return zero, zero, zero
    if topk_indices is None:
        if teacher is None:
            raise ValueError("distillation needs either the teacher or its cached top-k targets")
        with torch.no_grad():
            t_hidden, t_head, t_cap, _ = hidden_at(teacher, input_ids, attention_mask, where)
    targets, step = labels[where], chunk_tokens_for(vocab)
    if topk_indices is not None:
        topk_indices, topk_logprobs = topk_indices[where], topk_logprobs[where]  # (N, k): the loss positions

    def chunk(start: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL sum, KD sum) of the positions [start, start + len(h))."""
        end = start + h.shape[0]
        logits = softcap(head(h).float(), cap)[None]  # (1, n, V): the algos' (B, T, V) layout
        ones = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        nll = torch.nn.functional.cross_entropy(logits[0], targets[start:end], reduction="sum")
        if topk_indices is not None:
            kd = forward_kl_topk(
                logits,
                topk_indices[start:end][None],
                topk_logprobs[start:end][None],
                ones,
                cfg.temperature,
                cfg.scale_by_t2,
            )
        else:
            with torch.no_grad():
                t_logits = softcap(t_head(t_hidden[start:end]).float(), t_cap)[None]
            kd = generalized_jsd(logits, t_logits, ones, cfg.beta, cfg.temperature, cfg.scale_by_t2)
        return nll, kd * (end - start)  # the algos return means over the chunk: back to sums

    grad = torch.is_grad_enabled() and hidden.requires_grad
    nll_sum = kd_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, step):
        h = hidden[start : start + step]
        nll, kd = checkpoint(chunk, start, h, use_reentrant=False) if grad else chunk(start, h)
        nll_sum, kd_sum = nll_sum + nll, kd_sum + kd
    kd, nll = kd_sum / n, nll_sum / n
    return mixed_loss(kd, nll, cfg.alpha), kd, nll


@functools.cache
def distill_trainer_class():
    """The SFTTrainer subclass with the distillation loss (built on first use: importing trl is slow)."""
    from trl import SFTTrainer

    class DistillTrainer(SFTTrainer):
        """Trains on alpha * KD + (1 - alpha) * NLL; evaluates plain NLL (SFTTrainer's loss)."""

        def __init__(self, *args, distill_cfg: DistillConfig, teacher=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.distill_cfg = distill_cfg
            self.teacher = teacher.to(self.args.device) if teacher is not None else None

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "row_id" not in self._signature_columns:  # the collator looks up the cached top-k by row
                self._signature_columns = [*self._signature_columns, "row_id"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            topk = {k: inputs.pop(k) for k in ("topk_indices", "topk_logprobs") if k in inputs}
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            ids, attention = inputs["input_ids"], inputs["attention_mask"]
            if not topk and self.teacher is None:
                raise ValueError("offline distillation batch without cached teacher top-k (collator not wired)")
            labels = inputs["labels"][:, 1:]
            loss, kd, nll = forward_through(
                model,
                lean_distill_loss,
                ids,
                attention,
                labels,
                self.distill_cfg,
                None if topk else self.teacher,
                topk.get("topk_indices"),
                topk.get("topk_logprobs"),
            )
            outputs = None  # no full logits exist: the loss was computed chunk by chunk
            self._metrics["train"]["kd_loss"].append(kd.item())
            self._metrics["train"]["nll"].append(nll.item())
            if num_items_in_batch is not None:
                # Token-level mean over the whole accumulated (and, across ranks, gathered) batch, as SFT does;
                # the Trainer then does not divide by the accumulation steps.
                loss = loss * (labels != -100).sum() / torch.as_tensor(num_items_in_batch).clamp(min=1)
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


class Distill(Stage):
    name = "distill"
    Config = DistillConfig
    consumes = {"model": "model", "teacher": "teacher", "train_data": "train_data", "eval_data": "eval_data"}
    optional_inputs = {"eval_data"}
    produces = {"model": "model"}
    trains = True

    @classmethod
    def check_plan(cls, name: str, cfg, inputs: dict, artifacts: dict, kinds: dict) -> None:
        teacher_config = Path(str(inputs.get("teacher"))) / "config.json"
        if cfg.mode != "offline" or not teacher_config.is_file():  # a teacher not made yet: checked again later
            return
        config = json.loads(teacher_config.read_text())
        vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
        if vocab and cfg.top_k > vocab:
            raise ConfigError(f"{name}.top_k={cfg.top_k} is more than the teacher's vocabulary ({vocab} tokens)")

    def setup(self) -> None:
        from ..distill_cache import cache_key, check_same_vocab

        inp, c = self.ctx.inputs, self.cfg
        self.tokenizer = load_tokenizer(inp["model"])
        dev = self.ctx.device
        self.model = load_model(inp["model"], device=dev, dtype=torch.float32)  # fp32 master weights
        self.teacher = (
            load_model(inp["teacher"], device=dev, dtype=torch_dtype(self.ctx.precision)).eval().requires_grad_(False)
        )
        check_same_vocab(
            inp["model"],
            inp["teacher"],
            self.tokenizer,
            load_tokenizer(inp["teacher"]),
            self.model.get_output_embeddings().weight.shape[0],
            self.teacher.get_output_embeddings().weight.shape[0],
        )
        self.train_rows = read_rows(inp["train_data"], seed=self.ctx.seed)
        self.eval_rows = read_rows(inp["eval_data"], seed=self.ctx.seed) if inp.get("eval_data") else []
        # the accuracy check needs an oracle answer
        self.answer_rows = [r for r in self.eval_rows if r.get("answer") is not None]
        self.train_examples, self.too_long = self._fitting(self.train_rows, "training conversations")
        self.eval_examples, _ = self._fitting(self.eval_rows, "held-out conversations")
        self.cache = None
        if c.mode == "offline":
            self.cache_root = Path(c.cache_dir) if c.cache_dir else self.ctx.dir / "teacher_topk"
            self.cache_key = cache_key(
                inp["teacher"], inp["train_data"], self.tokenizer, c.top_k, c.temperature, c.max_length
            )

    def _open_cache(self) -> dict:
        """Rank 0 builds (or finds) the cache first; the other ranks then load it."""
        from ..distill_cache import compute_topk, open_or_build_cache

        c, distributed = self.cfg, self.ctx.world_size > 1
        build = functools.partial(
            compute_topk,
            self.teacher,
            self.train_examples,
            len(self.train_rows),
            c.top_k,
            c.temperature,
            self.tokenizer.pad_token_id,
            c.teacher_batch_size,
        )
        if distributed and not self.ctx.is_main:
            torch.distributed.barrier()
        about = {"teacher_dir": self.ctx.inputs["teacher"], "data_file": self.ctx.inputs["train_data"]}
        self.cache, status, folder = open_or_build_cache(self.cache_root, self.cache_key, build, about)
        if distributed and self.ctx.is_main:
            torch.distributed.barrier()
        return {"cache": status, "cache_dir": str(folder), "cache_entries": len(self.cache.positions)}

    def _training_args(self, config_cls, **extra):
        c, ctx, has_eval = self.cfg, self.ctx, bool(self.eval_examples)
        return config_cls(
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
                eval_on_start=has_eval,
                **extra,
            )
        )

    def _trainer(self):
        from datasets import Dataset

        c = self.cfg
        if c.mode == "on_policy":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = self._training_args(
                GKDConfig,
                lmbda=c.lmbda,
                beta=c.beta,
                seq_kd=c.seq_kd,
                temperature=c.rollout_temperature,
                max_new_tokens=c.rollout_max_new_tokens,
            )
            messages = lambda rows: Dataset.from_list([{"messages": r["messages"]} for r in rows])  # noqa: E731
            return GKDTrainer(
                model=self.model,
                teacher_model=self.teacher,
                args=args,
                train_dataset=messages(self.train_rows),
                eval_dataset=messages(self.eval_rows) if self.eval_rows else None,
                processing_class=self.tokenizer,
            )
        from trl import SFTConfig as TRLConfig
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        from ..distill_cache import TopKCollator

        # Labels are built by tokenize_for_loss (assistant-only), so TRL trains on them as given.
        args = self._training_args(TRLConfig, assistant_only_loss=False, packing=False)
        collator = TopKCollator(DataCollatorForLanguageModeling(pad_token_id=self.tokenizer.pad_token_id), self.cache)
        eval_ds = Dataset.from_list([{k: e[k] for k in ("input_ids", "labels")} for e in self.eval_examples])
        return distill_trainer_class()(
            model=self.model,
            args=args,
            train_dataset=Dataset.from_list(self.train_examples),
            eval_dataset=eval_ds if self.eval_examples else None,
            processing_class=self.tokenizer,
            data_collator=collator,
            distill_cfg=c,
            teacher=self.teacher if c.mode == "online" else None,
        )

    def _fitting(self, rows: list[dict], what: str) -> tuple[list[dict], int]:
        from ..distill_cache import tokenize_for_loss

        examples = tokenize_for_loss(self.tokenizer, rows)
        lengths = [len(e["input_ids"]) for e in examples]
        return keep_fitting(examples, lengths, self.cfg.max_length, self.ctx.name, what)

    def train(self) -> dict:
        metrics = {"mode": self.cfg.mode, "train_rows": len(self.train_examples), "train_rows_too_long": self.too_long}
        if self.cfg.mode == "offline":
            metrics.update(self._open_cache())
        if self.ctx.is_main and self.eval_examples:
            metrics["heldout_before"] = self._heldout(self.model)
            if self.cfg.eval_samples and self.answer_rows:
                metrics["accuracy_before"] = self._accuracy(self.model)
        self.trainer = self._trainer()
        metrics.update(train_from_last_checkpoint(self.trainer, self.ctx.dir / "checkpoints", self.log, self.ctx.name))
        if "heldout_before" in metrics:
            metrics["eval_loss_before"] = metrics["heldout_before"]["nll"]  # token-weighted NLL, as sft reports
        self.train_metrics = metrics
        return metrics

    def save(self) -> dict:
        """Write model/ atomically; then (rank 0) reload it for the held-out and accuracy checks."""
        ctx = self.ctx
        final = save_trained_model(ctx, self.trainer, self.tokenizer, ctx.precision)
        metrics = {}
        if ctx.is_main:
            student = load_saved(final, ctx)
            if self.eval_examples:
                metrics["heldout_after"] = self._heldout(student)
                if self.cfg.eval_samples and self.answer_rows:
                    metrics["accuracy_after"] = self._accuracy(student)
            if "heldout_after" in metrics:
                metrics["eval_loss_after"] = metrics["heldout_after"]["nll"]
            metrics["device"], metrics["precision"] = str(ctx.device), ctx.precision
            self._write_outputs({**self.train_metrics, **metrics})
        finish_trainer_stage(ctx, self.trainer, self.cfg.keep_checkpoints)
        return metrics

    def _write_outputs(self, metrics: dict) -> None:
        history = self.trainer.state.log_history
        plot_curves(
            curves_from_log_history(history, ["loss", "kd_loss", "nll", "eval_loss", "learning_rate"]),
            self.ctx.dir / "loss.png",
            title=f"distill ({self.cfg.mode})",
        )
        atomic_write_json(self.ctx.dir / "metrics.json", {"log_history": history, **metrics})
        atomic_write_text(self.ctx.dir / "report.md", self._report(metrics))

    def _report(self, m: dict) -> str:
        c, inp = self.cfg, self.ctx.inputs
        lines = [
            f"# distill ({c.mode})",
            "",
            f"- student: {inp['model']}",
            f"- teacher: {inp['teacher']}",
            f"- temperature {c.temperature}, alpha {c.alpha}, top_k {c.top_k}, beta {c.beta}; "
            f"{m.get('steps')} steps; teacher cache: {m.get('cache', 'n/a')}",
            "",
            "| held-out (reference answers) | before | after |",
            "|---|---|---|",
        ]
        b, a = m.get("heldout_before", {}), m.get("heldout_after", {})
        for key in ("nll", "perplexity", "kl_to_teacher"):
            lines.append(f"| {key} | {b.get(key, '-')} | {a.get(key, '-')} |")
        acc_b, acc_a = (m.get("accuracy_before") or {}), (m.get("accuracy_after") or {})
        lines.append(f"| task accuracy (greedy) | {acc_b.get('overall', '-')} | {acc_a.get('overall', '-')} |")
        return "\n".join(lines) + "\n"

    def _heldout(self, model) -> dict:
        from ..distill_cache import heldout_metrics

        return heldout_metrics(
            model, self.teacher, self.eval_examples, self.tokenizer.pad_token_id, self.cfg.teacher_batch_size
        )

    def _accuracy(self, model) -> dict:
        return greedy_accuracy(
            model, self.tokenizer, self.answer_rows, self.cfg.eval_samples, self.cfg.max_new_tokens, self.ctx.precision
        )


STAGE = Distill
