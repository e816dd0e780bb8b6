"""dpo: direct preference optimisation of the policy on preference pairs {chosen, rejected}.

Loss types (β = `beta`; Δ = log π(y|x) − log π_ref(y|x), summed over the answer's tokens):
- `sigmoid`: DPO (Rafailov et al. 2023), −log σ(β(Δ_w − Δ_l));
- `ipo`: IPO (Azar et al. 2023), (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))² (TRL normalises Δ by answer length);
- `hinge`: SLiC (Zhao et al. 2023), max(0, 1 − β(Δ_w − Δ_l));
- `robust`: robust DPO (Chowdhury et al. 2024) for labels flipped with probability ε = `label_smoothing`,
  ((1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))) / (1 − 2ε), h = Δ_w − Δ_l;
- `simpo`: SimPO (Meng et al. 2024), reference-free, −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ).
`sft_weight` α adds α times the chosen answers' mean token NLL (RPO, Pang et al. 2024; CPO's term for SimPO),
which keeps the likelihood of the chosen answers, `<end_of_turn>` included, from falling.
The first four run on TRL's DPOTrainer; SimPO (which TRL 1.16 has only in its experimental CPOTrainer)
is `algos.reward.simpo_loss` on our implicit-reward Trainer. An answer is its tokens up to and including
`<end_of_turn>`, the tokens a model generates, which is also what the held-out metrics score.

The reference π_ref is the input model loaded again from its local directory (or `reference`); with
LoRA it is the adapter-free base, so no second copy is kept. Full fine-tuning or LoRA (saved merged),
one process or DeepSpeed ranks; resumes from its last checkpoint.

Held-out metrics on `prefs_eval`, before (the input model) and after training:
- `likelihood_accuracy`: chosen ranked above rejected by the model's own mean answer log-probability
  (reference-free, SimPO's reward); before training this is the SFT model's accuracy;
- `implicit_reward_accuracy`: by the implicit reward β(log π − log π_ref) (simpo: β · mean log π) — 0.5
  before training, when π = π_ref (ties count half);
- greedy task accuracy on `eval_data` (`eval_samples` prompts), as sft reports it.

Output in run_dir/dpo/: model/, metrics.json, loss.png, rewards.png, logps.png.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field, model_validator

from ..checkpoint import train_from_last_checkpoint
from ..config import LoraSection, ModelDir, TrainerSection
from ..data import DataSource, read_rows
from ..dist.rank import torch_dtype
from ..pairs import PairCollator, TokenizedPair
from ..manifest import atomic_write_json
from ..models import load_model, load_tokenizer, stop_token_ids
from ..plots import curves_from_log_history, plot_curves
from ..rollout import RolloutBatch, token_logprobs
from .base import Stage
from .trainer_common import (
    finish_trainer_stage,
    greedy_accuracy,
    fitting_pairs,
    load_saved,
    save_trained_model,
    training_arguments,
)

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo"]
CURVES = {
    "loss.png": ["loss", "eval_loss"],
    "logps.png": ["logps/chosen", "logps/rejected"],
    "rewards.png": [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "eval_rewards/accuracies",
    ],
}
"""PNG -> log-history keys it plots (TRL's DPOTrainer keys; the SimPO trainer logs the same ones)."""


class DPOConfig(TrainerSection):
    """Config of the dpo stage."""

    model: ModelDir = None
    """Policy to train; default: the latest earlier stage's model (e.g. SFT)."""
    reference: ModelDir = None
    """Reference model π_ref directory; default: the input model (with LoRA its adapter-free base). Not with simpo."""
    prefs_train: DataSource = None
    """Preference pairs to train on (any preference layout); default: the prefs stage's train.jsonl."""
    prefs_eval: DataSource = None
    """Held-out preference pairs; default: the prefs stage's eval.jsonl."""
    eval_data: DataSource = None
    """Held-out conversations with answers, for greedy task accuracy; default: the data stage's."""
    loss_type: LossType = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC), robust (robust DPO), or simpo (SimPO, no reference)."""
    beta: Optional[float] = Field(None, gt=0)
    """β: the KL strength (ipo: its τ; simpo: the reward scale); default 0.1, or 2.0 for simpo."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """robust only: the probability ε that a preference label is flipped (the paper suggests 0.1)."""
    simpo_gamma: Optional[float] = Field(None, ge=0)
    """simpo only: the target reward margin γ; default 0.5."""
    sft_weight: float = Field(0.0, ge=0)
    """Weight α of the chosen answers' mean token NLL added to the loss (RPO, Pang et al. 2024; 0 = off)."""
    precompute_ref_log_probs: bool = False
    """Compute the reference log-probs of all pairs once before training; the reference is then not kept."""
    learning_rate: float = Field(1e-6, gt=0)
    """Peak learning rate (AdamW); TRL's default, for real models (the 0.85M quickstart model takes 1e-4)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the pairs (ignored when max_steps > 0)."""
    batch_size: int = Field(16, ge=1)
    """Pairs per device per step."""
    max_length: int = Field(256, ge=8)
    """Pairs with a conversation longer than this many tokens are left out (not truncated)."""
    lora: LoraSection = LoraSection()
    """LoRA settings (the adapters are saved merged into the weights)."""
    eval_samples: int = Field(100, ge=0)
    """Held-out prompts answered greedily before and after training for task accuracy (0 = skip)."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest greedy answer in the accuracy check."""
    score_batch_size: int = Field(32, ge=1)
    """Pairs per forward pass when scoring the held-out pairs."""

    @model_validator(mode="after")
    def _check(self):
        simpo = self.loss_type == "simpo"
        if self.beta is None:
            self.beta = 2.0 if simpo else 0.1
        if self.simpo_gamma is None and simpo:
            self.simpo_gamma = 0.5
        if simpo and self.reference:
            raise ValueError("loss_type simpo is reference-free: unset reference, or use a DPO loss type")
        if simpo and self.precompute_ref_log_probs:
            raise ValueError("loss_type simpo has no reference log-probs to precompute")
        if self.simpo_gamma is not None and not simpo:
            raise ValueError(f"simpo_gamma applies to loss_type simpo only (loss_type is {self.loss_type})")
        if self.loss_type == "robust" and self.label_smoothing == 0:
            raise ValueError("loss_type robust needs label_smoothing > 0 (with 0 it is plain sigmoid DPO)")
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(f"label_smoothing applies to loss_type robust only (loss_type is {self.loss_type})")
        return self


# ----------------------------------------------------------------------------------------------
# Trainers


@dataclass
class _PreferenceCollator:
    """TRL's preference collator with each answer cut after its first stop token. The Gemma template
    renders `<end_of_turn>\\n`; the newline after the end of the turn is never generated, so it is
    neither trained nor counted."""

    collator: object
    stop_ids: frozenset

    def __call__(self, examples: list[dict]) -> dict:
        return self.collator(
            [
                {**e, "chosen_ids": self._cut(e["chosen_ids"]), "rejected_ids": self._cut(e["rejected_ids"])}
                for e in examples
            ]
        )

    def _cut(self, ids: list[int]) -> list[int]:
        return next((ids[: i + 1] for i, t in enumerate(ids) if t in self.stop_ids), ids)


def build_trainer(
    model,
    ref_model,
    tokenizer,
    train: list[tuple[dict, TokenizedPair]],
    evals: list[tuple[dict, TokenizedPair]],
    cfg: DPOConfig,
    output_dir,
    seed: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    report_to: Sequence[str] = (),
):
    """TRL's DPOTrainer (sigmoid, ipo, hinge, robust) or our SimPOTrainer, on (row, tokenized pair) lists
    already filtered to max_length (also used directly by tests)."""
    from pathlib import Path

    args = training_arguments(
        cfg,
        output_dir,
        seed,
        torch.device(device),
        precision,
        bool(evals),
        report_to=report_to,
        stage_dir=Path(output_dir).parent,
    )
    peft_config = cfg.lora.peft_config("CAUSAL_LM")
    if cfg.loss_type == "simpo":
        from transformers import TrainingArguments

        if peft_config is not None:
            from peft import get_peft_model

            torch.manual_seed(seed)  # the adapters' random init: TRL's DPOTrainer seeds before making them
            model = get_peft_model(model, peft_config)
        from ..pair_trainer import SimPOTrainer

        return SimPOTrainer(
            model=model,
            args=TrainingArguments(remove_unused_columns=False, **args),
            train_dataset=[p for _, p in train],
            eval_dataset=[p for _, p in evals] or None,
            data_collator=PairCollator(tokenizer.pad_token_id, use_margin=False),
            beta=cfg.beta,
            gamma=cfg.simpo_gamma,
            sft_weight=cfg.sft_weight,
        )
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    def dataset(pairs):
        return (
            Dataset.from_list(
                [
                    {"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
                    for r, _ in pairs
                ]
            )
            if pairs
            else None
        )

    losses = {cfg.loss_type: 1.0, **({"sft": cfg.sft_weight} if cfg.sft_weight else {})}
    dpo_args = TRLDPOConfig(
        loss_type=list(losses),
        loss_weights=list(losses.values()),
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        **args,
    )
    collator = _PreferenceCollator(
        DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id), frozenset(stop_token_ids(tokenizer))
    )
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_args,
        data_collator=collator,
        train_dataset=dataset(train),
        eval_dataset=dataset(evals),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


# ----------------------------------------------------------------------------------------------
# Held-out metrics


@torch.no_grad()
def answer_logps(model, pairs: list[TokenizedPair], pad_id: int, batch_size: int) -> torch.Tensor:
    """(N, 4): each pair's summed answer log-probability and answer length, chosen then rejected."""
    was_training, out, device = model.training, [], next(model.parameters()).device
    model.eval()
    collate = PairCollator(pad_id, use_margin=False)
    for i in range(0, len(pairs), batch_size):
        b = collate(pairs[i : i + batch_size])
        batch = RolloutBatch(*(b[k].to(device) for k in ("input_ids", "attention_mask", "response_mask")), None, None)
        sums, lens = (token_logprobs(model, batch) * batch.response_mask).sum(-1), batch.response_mask.sum(-1)
        out.append(torch.stack([*sums.chunk(2), *lens.chunk(2)], dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 4)


def pair_accuracy(diff: torch.Tensor) -> float:
    """Share of pairs with chosen above rejected, ties counting half."""
    return round(((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item(), 4)


def heldout_metrics(logps: torch.Tensor, ref: Optional[torch.Tensor], beta: float) -> dict:
    """Metrics of one model's `answer_logps`: the likelihood ranking (mean log-prob) and the implicit
    reward's, β(log π − log π_ref) summed over the answer, or β · mean log π when `ref` is None (SimPO)."""
    mean_c, mean_r = logps[:, 0] / logps[:, 2].clamp(min=1), logps[:, 1] / logps[:, 3].clamp(min=1)
    if ref is None:
        r_c, r_r = beta * mean_c, beta * mean_r
    else:
        r_c, r_r = beta * (logps[:, 0] - ref[:, 0]), beta * (logps[:, 1] - ref[:, 1])
    return {
        "likelihood_accuracy": pair_accuracy(mean_c - mean_r),
        "implicit_reward_accuracy": pair_accuracy(r_c - r_r),
        "implicit_reward_margin": round((r_c - r_r).mean().item(), 4),
        "chosen_logp": round(logps[:, 0].mean().item(), 4),
        "rejected_logp": round(logps[:, 1].mean().item(), 4),
    }


# ----------------------------------------------------------------------------------------------
# The stage


class DPO(Stage):
    name = "dpo"
    Config = DPOConfig
    consumes = {"model": "model", "prefs_train": "prefs_train", "prefs_eval": "prefs_eval", "eval_data": "eval_data"}
    optional_inputs = {"prefs_eval", "eval_data"}
    produces = {"model": "model"}
    trains = True

    def setup(self) -> None:
        inp, c, dev = self.ctx.inputs, self.cfg, self.ctx.device
        self.tokenizer = load_tokenizer(inp["model"])
        self.model = load_model(inp["model"], device=dev, dtype=torch.float32)  # fp32 master weights
        # π_ref from its local directory (never rebuilt from config._name_or_path). No copy when LoRA's
        # adapter-free base is the reference, when SimPO needs none, or when its log-probs are precomputed.
        own_copy = c.reference or not (c.lora.enabled or c.loss_type == "simpo" or c.precompute_ref_log_probs)
        self.ref_model = (
            load_model(c.reference or inp["model"], device=dev, dtype=torch_dtype(self.ctx.precision)).eval()
            if own_copy
            else None
        )
        self.train_pairs, self.too_long = self._pairs(inp["prefs_train"], "training pairs")
        self.eval_pairs, _ = self._pairs(inp["prefs_eval"], "held-out pairs") if inp.get("prefs_eval") else ([], 0)
        rows = (
            read_rows(inp["eval_data"], seed=self.ctx.seed)[: c.eval_samples]
            if inp.get("eval_data") and c.eval_samples
            else []
        )
        self.eval_rows = [r for r in rows if r.get("answer") is not None]  # the accuracy check needs an oracle

    def _pairs(self, path: str, what: str) -> tuple[list[tuple[dict, TokenizedPair]], int]:
        rows = read_rows(path, "preference", seed=self.ctx.seed)
        return fitting_pairs(self.tokenizer, rows, self.cfg.max_length, self.ctx.name, what)

    def train(self) -> dict:
        c, metrics = self.cfg, {"train_pairs": len(self.train_pairs), "train_pairs_too_long": self.too_long}
        if self.ctx.is_main:  # the input model, before any training step
            if self.eval_rows:
                metrics["accuracy_before"] = self._accuracy(self.model)
            if self.eval_pairs:
                pairs = [p for _, p in self.eval_pairs]
                self.before = answer_logps(self.model, pairs, self.tokenizer.pad_token_id, c.score_batch_size)
                self.ref_logps = (
                    None
                    if c.loss_type == "simpo"
                    else (
                        answer_logps(self.ref_model, pairs, self.tokenizer.pad_token_id, c.score_batch_size)
                        if c.reference
                        else self.before
                    )
                )
        ctx = self.ctx
        self.trainer = build_trainer(
            self.model,
            self.ref_model,
            self.tokenizer,
            self.train_pairs,
            self.eval_pairs,
            c,
            ctx.dir / "checkpoints",
            ctx.seed,
            ctx.device,
            ctx.precision,
            ctx.report_to,
        )
        metrics.update(train_from_last_checkpoint(self.trainer, self.ctx.dir / "checkpoints", self.log, self.ctx.name))
        self.train_metrics = metrics
        return metrics

    def save(self) -> dict:
        """Write model/ atomically; then (rank 0) reload it for the held-out metrics after training."""
        ctx = self.ctx
        final = save_trained_model(ctx, self.trainer, self.tokenizer, ctx.precision, merge_lora=self.cfg.lora.enabled)
        metrics = {}
        if ctx.is_main:
            history = self.trainer.state.log_history
            for png, keys in CURVES.items():
                plot_curves(
                    curves_from_log_history(history, keys), self.ctx.dir / png, title=f"dpo ({self.cfg.loss_type})"
                )
            metrics = self._evaluate(final)
            metrics["device"], metrics["precision"] = str(ctx.device), ctx.precision
            atomic_write_json(ctx.dir / "metrics.json", {**self.train_metrics, **metrics, "log_history": history})
        finish_trainer_stage(ctx, self.trainer, self.cfg.keep_checkpoints)
        return metrics

    def _evaluate(self, model_dir) -> dict:
        """Held-out pair metrics before and after, and greedy task accuracy after, of the saved model."""
        model, c, metrics = load_saved(model_dir, self.ctx), self.cfg, {}
        if self.eval_pairs:
            after = answer_logps(
                model, [p for _, p in self.eval_pairs], self.tokenizer.pad_token_id, c.score_batch_size
            )
            ref = self.ref_logps

            def held(logps, keep):
                return heldout_metrics(logps[keep], None if ref is None else ref[keep], c.beta)

            everything = torch.ones(len(after), dtype=torch.bool)
            metrics["heldout"] = {
                "pairs": len(after),
                "beta": c.beta,
                "before": held(self.before, everything),
                "after": held(after, everything),
                "per_source": {},
            }
            sources = [r.get("source", "?") for r, _ in self.eval_pairs]
            for src in sorted(set(sources)):
                keep = torch.tensor([s == src for s in sources])
                metrics["heldout"]["per_source"][src] = {
                    "pairs": int(keep.sum()),
                    "likelihood_accuracy_before": held(self.before, keep)["likelihood_accuracy"],
                    "implicit_reward_accuracy_after": held(after, keep)["implicit_reward_accuracy"],
                }
        if self.eval_rows:
            metrics["accuracy_after"] = self._accuracy(model)
        return metrics

    def _accuracy(self, model) -> dict:
        return greedy_accuracy(
            model, self.tokenizer, self.eval_rows, self.cfg.eval_samples, self.cfg.max_new_tokens, self.ctx.precision
        )


STAGE = DPO
