"""rm: a Bradley-Terry reward model trained on preference pairs.

Two heads, one loss per pair: −log σ(r_chosen − r_rejected − margin) (margin only with `use_margin`),
plus `center_rewards_coefficient`·mean((r_c + r_r)²) when set.
- `head: sequence_classification` (default): the policy checkpoint (SFT by default) with a one-output
  sequence-classification head on its last non-pad token, trained with TRL's RewardTrainer.
- `head: implicit`: the checkpoint stays a causal LM and r = β · mean log π(answer | prompt), SimPO's
  reference-free reward, trained with our Trainer (`posttrain/implicit_rm.py`). It uses the likelihoods the
  model learnt in SFT, so it generalises from far fewer pairs on small models (see the README's numbers).
Full fine-tuning or LoRA (always saved merged), in one process or as DeepSpeed ranks; resumes from its
last checkpoint.

After training, rank 0 reloads the saved model through the scoring API (what PPO will use) and measures:
- held-out pairs: pairwise accuracy, mean margin r_c − r_r, mean/std of chosen and rejected rewards;
- ROC AUC of the reward vs the verifiers' correct/incorrect label, on fresh policy samples of held-out
  prompts (Mann-Whitney form; skipped with a note when one class is empty).

Output in run_dir/rm/: model/ (an HF sequence-classification dir loadable by `load_model(path, kind="reward")`,
or for the implicit head a causal LM dir with `reward_head.json`; both with tokenizer and chat template and
both scored by `Scorer`), metrics.json, curves.png (loss, accuracy), scores.png (histogram).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from ..checkpoint import train_from_last_checkpoint
from ..config import InputPath, LoraSection, Section, TrainerSection
from ..data import DataSource, read_rows
from ..evaluation import DEFAULT_VERIFIERS
from ..generate import SamplingConfig
from ..manifest import atomic_write_json
from ..models import finish_model_dir, start_model_dir
from ..plots import curves_from_log_history, plot_curves, save_figure
from ..scoring import RewardFunctionError, RuleSpec, ScoringConfig
from .base import Stage

LABEL_RULES = [RuleSpec(path=DEFAULT_VERIFIERS, function=f) for f in ("task_correct", "refusal", "identity")]


class RMLoraConfig(LoraSection):
    """Low-rank adaptation (peft) of the reward model; the score head is always trained in full."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights (saved merged into full weights)."""


class AUCConfig(Section):
    """ROC AUC of reward-model scores against verifier labels on fresh policy samples."""

    prompts: int = Field(64, ge=0)
    """Held-out prompts to sample (0 = skip the AUC)."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, n=4, max_new_tokens=32)
    """How the policy samples (backend hf or vllm; seed None: the pipeline seed)."""
    vllm: dict = {}
    """Extra vLLM engine options for sampling.backend=vllm (e.g. max_num_batched_tokens: 65536)."""
    rules: list[RuleSpec] = LABEL_RULES
    """Verifiers labelling a sample: correct when every rule scores >= 0.5."""


class RMConfig(TrainerSection):
    """Config of the rm stage."""

    model: InputPath = None
    """Checkpoint the reward model starts from; default: the latest earlier stage's model (e.g. SFT)."""
    policy: InputPath = None
    """Policy sampled for the AUC check; default: the latest earlier stage's model."""
    prefs_train: DataSource = None
    """Preference pairs to train on (a path, a source mapping or a mixture); default: the prefs stage's train.jsonl."""
    prefs_eval: DataSource = None
    """Held-out preference pairs (path, mapping or mixture); default: the prefs stage's eval.jsonl."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate (AdamW)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the pairs (ignored when max_steps > 0)."""
    batch_size: int = Field(16, ge=1)
    """Pairs per device per step."""
    max_length: int = Field(256, ge=8)
    """Pairs with a conversation longer than this many tokens are left out (TRL's filter)."""
    head: Literal["sequence_classification", "implicit"] = "sequence_classification"
    """sequence_classification: a new scalar head on the last token (TRL RewardTrainer); implicit: β · mean
    log-likelihood of the answer under the fine-tuned LM itself (SimPO's reference-free reward)."""
    beta: float = Field(2.0, gt=0)
    """Scale β of the implicit reward (head: implicit only; SimPO uses 2-2.5)."""
    use_margin: bool = False
    """Subtract each pair's margin inside the loss, −log σ(r_c − r_r − m) (Llama 2's margin loss)."""
    center_rewards_coefficient: Optional[float] = Field(None, ge=0)
    """Weight of mean((r_c + r_r)²) added to the loss, keeping rewards centred on 0; None: off."""
    lora: RMLoraConfig = RMLoraConfig()
    """LoRA settings."""
    logging_steps: int = Field(10, ge=1)
    """Log the training loss and accuracy every N steps."""
    eval_steps: int = Field(50, ge=1)
    """Compute held-out loss and accuracy every N steps."""
    score_batch_size: int = Field(32, ge=1)
    """Conversations per forward pass when scoring held-out pairs and samples."""
    auc: AUCConfig = AUCConfig()
    """The reward-vs-verifier AUC check."""

    @model_validator(mode="after")
    def _lora_not_sharded(self):
        if self.lora.enabled and self.distributed.num_processes > 1 and self.distributed.zero_stage == 3:
            raise ValueError("lora is saved merged, which ZeRO-3's sharded weights do not allow; use zero_stage 2")
        return self


# ----------------------------------------------------------------------------------------------
# Inputs


def read_pairs(path, seed: int = 0) -> list[dict]:
    """Preference rows {chosen, rejected, margin?} of any preference format (posttrain.data.formats checks that
    both end on the answer after the same prompt turns); errors name file, row and what was expected."""
    return read_rows(path, "preference", seed=seed)


def check_reward_family(path: str | Path, key: str = "rm.model", head: str = "sequence_classification") -> None:
    """Raise a clear error when `path` cannot start a reward model with this head: a LoRA adapter
    directory, or (sequence_classification) a family transformers has no sequence classifier for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from ..models import check_model_dir

    cfg_file = check_model_dir(path) / "config.json"
    if (Path(path) / "adapter_config.json").is_file():
        raise ValueError(f"{path}: a LoRA adapter directory cannot start a reward model; save the policy "
                         f"merged (sft.lora.save=merged) or set {key} to a full model directory")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if head == "sequence_classification" and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"{path}: model family {model_type!r} has no sequence-classification class in "
                         f"transformers, so it cannot become a reward model with that head; set rm.head to "
                         f"implicit (any causal LM) or {key} to a checkpoint of another family (e.g. gemma, "
                         f"gemma2 or llama)")


def load_reward_init(path: str | Path, seed: int, head: str = "sequence_classification"):
    """The checkpoint as a one-output sequence classifier (its new score head seeded), or for the implicit
    head as the causal LM it is."""
    from ..models import load_model

    check_reward_family(path, head=head)
    torch.manual_seed(seed)
    # load_model picks the attention the scorer will use too (eager for Gemma 2: SDPA drops soft-capping)
    return load_model(path, kind="causal_lm" if head == "implicit" else "reward")


def pairs_dataset(rows: list[dict], use_margin: bool):
    """A datasets.Dataset of conversational chosen/rejected (and margin, 0 where a row has none)."""
    from datasets import Dataset

    cols = {"chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]}
    if use_margin:
        cols["margin"] = [float(r.get("margin", 0.0)) for r in rows]
    return Dataset.from_dict(cols)


def _training_args(cfg: RMConfig, output_dir: str | Path, seed: int, with_eval: bool) -> dict:
    """TrainingArguments fields both heads' trainers take from the stage config."""
    from ..launch import trainer_kwargs

    c = cfg
    return dict(
        output_dir=str(output_dir), learning_rate=c.learning_rate, num_train_epochs=c.epochs, max_steps=c.max_steps,
        per_device_train_batch_size=c.batch_size, per_device_eval_batch_size=c.batch_size,
        gradient_accumulation_steps=c.grad_accum, warmup_steps=c.warmup, lr_scheduler_type=c.scheduler,
        weight_decay=c.weight_decay, gradient_checkpointing=c.gradient_checkpointing,
        logging_steps=c.logging_steps, logging_first_step=True,
        eval_strategy="steps" if with_eval else "no", eval_steps=c.eval_steps,
        save_strategy="steps", save_steps=c.save_steps, save_total_limit=2, report_to="none",
        seed=seed, data_seed=seed, dataloader_num_workers=0, bf16=False, **trainer_kwargs(c.distributed),
    )


def build_trainer(model, tokenizer, train_ds, eval_ds, cfg: RMConfig, output_dir: str | Path, seed: int):
    """TRL's RewardTrainer set up from the stage config (also used directly by tests)."""
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards_coefficient,
                        **_training_args(cfg, output_dir, seed, eval_ds is not None))
    peft_config = cfg.lora.peft_config("SEQ_CLS")  # SEQ_CLS: the new `score` head is trained in full
    tokenizer.padding_side = "right"  # TRL's collator pads right; the head pools the last non-pad token
    return RewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config)


def build_implicit_trainer(model, tokenizer, train_pairs: list, eval_pairs: list, cfg: RMConfig,
                           output_dir: str | Path, seed: int):
    """The implicit head's Trainer on `tokenize_pairs` output already filtered to max_length (also used
    by tests)."""
    from transformers import TrainingArguments

    from ..implicit_rm import ImplicitRewardTrainer, PairCollator

    args = TrainingArguments(remove_unused_columns=False, **_training_args(cfg, output_dir, seed, bool(eval_pairs)))
    peft_config = cfg.lora.peft_config("CAUSAL_LM")
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return ImplicitRewardTrainer(model=model, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs or None,
                                 data_collator=PairCollator(tokenizer.pad_token_id, cfg.use_margin), beta=cfg.beta,
                                 center_coef=cfg.center_rewards_coefficient)


# ----------------------------------------------------------------------------------------------
# Metrics


def roc_auc(scores: list[float], labels: list[bool]) -> Optional[float]:
    """ROC AUC in Mann-Whitney form: P(score of a positive > score of a negative), ties counting 1/2.

    Computed from average ranks: AUC = (R_pos − n_pos(n_pos+1)/2) / (n_pos·n_neg). None if a class is empty.
    """
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # tied scores share the average of the ranks they span
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Pairwise accuracy, mean margin r_c − r_r, and the two reward distributions."""
    diff = chosen - rejected
    return {"pairs": len(diff), "accuracy": round((diff > 0).float().mean().item(), 4),
            "mean_margin": round(diff.mean().item(), 4),
            "chosen_mean": round(chosen.mean().item(), 4), "chosen_std": round(chosen.std().item(), 4),
            "rejected_mean": round(rejected.mean().item(), 4), "rejected_std": round(rejected.std().item(), 4)}


def plot_histogram(chosen: list[float], rejected: list[float], out: Path, title: str) -> Path:
    """Overlaid histograms of chosen and rejected rewards (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    import numpy as np

    bins = np.histogram_bin_edges(chosen + rejected, bins=30)  # shared edges: the bars line up
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (n={len(chosen)})")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (n={len(rejected)})")
    ax.set_xlabel("reward")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)


# ----------------------------------------------------------------------------------------------
# The stage


class RM(Stage):
    name = "rm"
    Config = RMConfig
    consumes = {"model": "model", "policy": "model", "prefs_train": "prefs_train", "prefs_eval": "prefs_eval"}
    optional_inputs = {"policy", "prefs_eval"}
    produces = {"reward_model": "model"}
    trains = True

    def setup(self) -> None:
        from ..models import load_tokenizer

        inp = self.ctx.inputs
        self.train_rows = read_pairs(inp["prefs_train"], self.ctx.seed)
        self.eval_rows = read_pairs(inp["prefs_eval"], self.ctx.seed) if inp.get("prefs_eval") else []
        self.tokenizer = load_tokenizer(inp["model"])
        self.model = load_reward_init(inp["model"], self.ctx.seed, self.cfg.head)

    def train(self) -> dict:
        out, c = self.ctx.dir / "checkpoints", self.cfg
        if c.head == "implicit":
            from ..implicit_rm import tokenize_pairs

            fits = [p for p in tokenize_pairs(self.tokenizer, self.train_rows) if p.length <= c.max_length]
            eval_fits = [p for p in tokenize_pairs(self.tokenizer, self.eval_rows) if p.length <= c.max_length]
            self.trainer = build_implicit_trainer(self.model, self.tokenizer, fits, eval_fits, c, out, self.ctx.seed)
        else:
            eval_ds = pairs_dataset(self.eval_rows, c.use_margin) if self.eval_rows else None
            self.trainer = build_trainer(self.model, self.tokenizer, pairs_dataset(self.train_rows, c.use_margin),
                                         eval_ds, c, out, self.ctx.seed)
        metrics = {"train_pairs": len(self.trainer.train_dataset),
                   "train_pairs_too_long": len(self.train_rows) - len(self.trainer.train_dataset)}
        metrics.update(train_from_last_checkpoint(self.trainer, self.ctx.dir / "checkpoints", self.log, "rm"))
        evals = [e for e in self.trainer.state.log_history if "eval_loss" in e]
        if evals:
            metrics["trainer_eval_accuracy"] = round(evals[-1].get("eval_accuracy", float("nan")), 4)
        return metrics

    def save(self) -> dict:
        """Write model/ atomically; then (rank 0) reload it through the scoring API and measure."""
        final, partial = start_model_dir(self.ctx.dir, self.trainer, self.ctx.is_main)
        if self.cfg.lora.enabled:
            merged = self.trainer.accelerator.unwrap_model(self.trainer.model).merge_and_unload()
            if self.ctx.is_main:
                merged.save_pretrained(partial, safe_serialization=True)
        else:
            self.trainer.save_model(str(partial))  # gathers ZeRO-3 shards on every rank
        metrics = {}
        if self.ctx.is_main:
            self.tokenizer.padding_side = "right"
            if self.cfg.head == "implicit":
                from ..implicit_rm import write_reward_head

                write_reward_head(partial, self.cfg.beta)
            finish_model_dir(partial, final, self.tokenizer, generation=False)  # a scorer: no generation config
            history = self.trainer.state.log_history
            plot_curves(curves_from_log_history(history, ["loss", "accuracy", "eval_loss", "eval_accuracy"]),
                        self.ctx.dir / "curves.png", title="Reward model")
            from ..launch import end_sharded_init

            end_sharded_init()
            metrics = self.evaluate(final)
            atomic_write_json(self.ctx.dir / "metrics.json", {"log_history": history, **metrics})
            if not self.cfg.keep_checkpoints:
                shutil.rmtree(self.ctx.dir / "checkpoints", ignore_errors=True)
        self.trainer.accelerator.wait_for_everyone()
        return metrics

    def evaluate(self, model_dir: Path) -> dict:
        """Held-out pair metrics and the verifier AUC, scored by the saved model via the scoring API."""
        from ..scoring import Scorer

        scorer = Scorer(ScoringConfig(batch_size=self.cfg.score_batch_size), reward_model_dir=str(model_dir))
        metrics = {}
        if self.eval_rows:
            chosen, rejected = score_pairs(scorer, self.eval_rows)
            metrics["heldout"] = pair_metrics(chosen, rejected)
            sources = [":".join(str(r[k]) for k in ("source", "corruption") if k in r) for r in self.eval_rows]
            metrics["heldout_accuracy_per_source"] = {}
            for src in sorted(set(sources)):
                mask = torch.tensor([s == src for s in sources])
                metrics["heldout_accuracy_per_source"][src] = pair_metrics(chosen[mask], rejected[mask])["accuracy"]
            plot_histogram(chosen.tolist(), rejected.tolist(), self.ctx.dir / "scores.png", "Held-out rewards")
        metrics["auc"] = self.verifier_auc(scorer)
        return metrics

    def verifier_auc(self, rm_scorer) -> dict:
        """Sample the policy on held-out prompts, label by the verifiers, and take the AUC of RM scores."""
        from ..generate import make_engine
        from ..scoring import Scorer

        c = self.cfg.auc
        rows = _unique_prompts(self.eval_rows)[:c.prompts]
        if not rows:
            return {"auc": None, "note": "skipped: auc.prompts is 0 or there are no held-out pairs"}
        policy = self.ctx.inputs.get("policy") or self.ctx.inputs["model"]
        sampling = c.sampling.model_copy(update={"seed": c.sampling.seed if c.sampling.seed is not None else self.ctx.seed})
        options = {"seed": self.ctx.seed, **c.vllm} if sampling.backend == "vllm" else {}
        engine = make_engine(policy, sampling.backend, **options)
        try:
            samples = engine.generate([r["prompt"] for r in rows], sampling)
        finally:
            if hasattr(engine, "close"):
                engine.close()
        flat_rows = [r for r, per in zip(rows, samples) for _ in per]
        prompts, texts = [r["prompt"] for r in flat_rows], [s.text for per in samples for s in per]
        meta = [{k: v for k, v in r.items() if k != "prompt"} for r in flat_rows]
        try:
            parts = Scorer(ScoringConfig(rules=c.rules, use_reward_model=False)).score(prompts, texts, meta).parts
        except RewardFunctionError as err:  # e.g. held-out pairs without the 'answer' column
            return {"auc": None, "note": f"skipped: the verifiers could not label the samples: {err}"}
        labels = torch.stack([p >= 0.5 for p in parts.values()]).all(0).tolist()
        scores = rm_scorer.reward_model_scores(prompts, texts).tolist()
        auc = roc_auc(scores, labels)
        out = {"auc": None if auc is None else round(auc, 4), "samples": len(texts),
               "correct": sum(labels), "incorrect": len(labels) - sum(labels)}
        if auc is None:
            out["note"] = "skipped: every sample is " + ("correct" if sum(labels) else "incorrect") + \
                          " by the verifiers, so there is nothing to rank"
        return out


def score_pairs(scorer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of each pair's chosen and rejected conversation."""
    prompts = [r["chosen"][:-1] for r in rows]
    chosen = scorer.reward_model_scores(prompts, [r["chosen"][-1]["content"] for r in rows])
    rejected = scorer.reward_model_scores(prompts, [r["rejected"][-1]["content"] for r in rows])
    return chosen, rejected


def _unique_prompts(rows: list[dict]) -> list[dict]:
    """One entry per distinct prompt: {"prompt": messages, **metadata (task, answer, ...)}, in file order."""
    seen, out = set(), []
    skip = {"chosen", "rejected", "margin", "source", "corruption"}
    for r in rows:
        key = json.dumps(r["chosen"][:-1], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append({"prompt": r["chosen"][:-1], **{k: v for k, v in r.items() if k not in skip}})
    return out



STAGE = RM
