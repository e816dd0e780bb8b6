"""rm: a Bradley-Terry reward model trained on preference pairs.

Two heads, one loss per pair: −log σ(r_chosen − r_rejected − margin) (margin only with `use_margin`),
plus `center_rewards_coefficient`·mean((r_c + r_r)²) when set.
- `head: sequence_classification` (default): the policy checkpoint (SFT by default) with a one-output
  sequence-classification head on its last non-pad token, trained with TRL's RewardTrainer.
- `head: implicit`: the checkpoint stays a causal LM and r = β · mean log π(answer | prompt), SimPO's
  reference-free reward, trained with our Trainer (`posttrain/pair_trainer.py`). It uses the likelihoods the
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
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field

from ..checkpoint import train_from_last_checkpoint
from ..config import ModelDir, LoraSection, Section, TrainerSection
from ..data import DataSource, read_rows
from ..evaluation import DEFAULT_VERIFIERS
from ..dist.trainable import end_sharded_init
from ..engines import SamplingConfig, VLLMOptions, generate_all, make_engine
from ..implicit_rm import write_reward_head
from ..pairs import PairCollator
from ..manifest import atomic_write_json
from ..models import load_model, load_tokenizer
from ..plots import curves_from_log_history, plot_curves, pyplot, save_figure
from ..scoring import RewardFunctionError, RuleSpec, Scorer, ScoringConfig
from .base import Stage
from .trainer_common import finish_trainer_stage, fitting_pairs, save_trained_model, training_arguments

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
    vllm: VLLMOptions = VLLMOptions()
    """vLLM engine settings for sampling.backend=vllm (e.g. max_num_batched_tokens: 65536)."""
    rules: list[RuleSpec] = LABEL_RULES
    """Verifiers labelling a sample: correct when every rule scores >= 0.5."""


class RMConfig(TrainerSection):
    """Config of the rm stage."""

    model: ModelDir = None
    """Checkpoint the reward model starts from; default: the latest earlier stage's model (e.g. SFT)."""
    policy: ModelDir = None
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
        raise ValueError(
            f"{path}: a LoRA adapter directory cannot start a reward model; save the policy "
            f"merged (sft.lora.save=merged) or set {key} to a full model directory"
        )
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if head == "sequence_classification" and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(
            f"{path}: model family {model_type!r} has no sequence-classification class in "
            f"transformers, so it cannot become a reward model with that head; set rm.head to "
            f"implicit (any causal LM) or {key} to a checkpoint of another family (e.g. gemma, "
            f"gemma2 or llama)"
        )


def load_reward_init(
    path: str | Path, seed: int, head: str = "sequence_classification", device: torch.device | str = "cpu"
):
    """The checkpoint on `device` in fp32 (master weights) as a one-output sequence classifier (its new
    score head seeded), or for the implicit head as the causal LM it is."""
    check_reward_family(path, head=head)
    torch.manual_seed(seed)
    # load_model picks the attention the scorer will use too (eager for Gemma 2: SDPA drops soft-capping)
    return load_model(path, device=device, dtype=torch.float32, kind="causal_lm" if head == "implicit" else "reward")


def pairs_dataset(rows: list[dict], use_margin: bool):
    """A datasets.Dataset of conversational chosen/rejected (and margin, 0 where a row has none)."""
    from datasets import Dataset

    cols = {"chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]}
    if use_margin:
        cols["margin"] = [float(r.get("margin", 0.0)) for r in rows]
    return Dataset.from_dict(cols)


def build_trainer(
    model,
    tokenizer,
    train_ds,
    eval_ds,
    cfg: RMConfig,
    output_dir: str | Path,
    seed: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    report_to: Sequence[str] = (),
):
    """TRL's RewardTrainer set up from the stage config (also used directly by tests)."""
    from trl import RewardConfig

    from ..pair_trainer import PairMeanRewardTrainer

    args = RewardConfig(
        **training_arguments(
            cfg,
            output_dir,
            seed,
            torch.device(device),
            precision,
            eval_ds is not None,
            report_to=report_to,
            stage_dir=Path(output_dir).parent,
            max_length=cfg.max_length,
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        )
    )
    peft_config = cfg.lora.peft_config("SEQ_CLS")  # SEQ_CLS: the new `score` head is trained in full
    tokenizer.padding_side = "right"  # TRL's collator pads right; the head pools the last non-pad token
    return PairMeanRewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def build_implicit_trainer(
    model,
    tokenizer,
    train_pairs: list,
    eval_pairs: list,
    cfg: RMConfig,
    output_dir: str | Path,
    seed: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    report_to: Sequence[str] = (),
):
    """The implicit head's Trainer on `tokenize_pairs` output already filtered to max_length (also used
    by tests)."""
    from transformers import TrainingArguments

    from ..pair_trainer import ImplicitRewardTrainer

    args = TrainingArguments(
        **training_arguments(
            cfg,
            output_dir,
            seed,
            torch.device(device),
            precision,
            bool(eval_pairs),
            report_to=report_to,
            stage_dir=Path(output_dir).parent,
            remove_unused_columns=False,
        )
    )
    peft_config = cfg.lora.peft_config("CAUSAL_LM")
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return ImplicitRewardTrainer(
        model=model,
        args=args,
        train_dataset=train_pairs,
        eval_dataset=eval_pairs or None,
        data_collator=PairCollator(tokenizer.pad_token_id, cfg.use_margin),
        beta=cfg.beta,
        center_coef=cfg.center_rewards_coefficient,
    )


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
    return {
        "pairs": len(diff),
        "accuracy": round((diff > 0).float().mean().item(), 4),
        "mean_margin": round(diff.mean().item(), 4),
        "chosen_mean": round(chosen.mean().item(), 4),
        "chosen_std": _std(chosen),
        "rejected_mean": round(rejected.mean().item(), 4),
        "rejected_std": _std(rejected),
    }


def _std(values: torch.Tensor) -> Optional[float]:
    """Sample standard deviation, None for fewer than two values."""
    return round(values.std().item(), 4) if values.numel() > 1 else None


def plot_histogram(chosen: list[float], rejected: list[float], out: Path, title: str) -> Path:
    """Overlaid histograms of chosen and rejected rewards (PNG, written atomically)."""
    plt = pyplot()

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
        inp, ctx = self.ctx.inputs, self.ctx
        self.train_rows = read_pairs(inp["prefs_train"], ctx.seed)
        self.eval_rows = read_pairs(inp["prefs_eval"], ctx.seed) if inp.get("prefs_eval") else []
        if self.cfg.use_margin and not any("margin" in r for r in self.train_rows):  # else it would change nothing
            raise ValueError(
                f"{ctx.name}.use_margin is true, but none of the {len(self.train_rows)} training pairs has a "
                f"'margin' column (rename the column that holds it, e.g. columns: {{score_gap: margin}})"
            )
        self.tokenizer = load_tokenizer(inp["model"])
        self.model = load_reward_init(inp["model"], ctx.seed, self.cfg.head, ctx.device)

    def train(self) -> dict:
        out, c, ctx = self.ctx.dir / "checkpoints", self.cfg, self.ctx
        train, _ = fitting_pairs(self.tokenizer, self.train_rows, c.max_length, ctx.name, "training pairs")
        held_out, _ = fitting_pairs(self.tokenizer, self.eval_rows, c.max_length, ctx.name, "held-out pairs")
        if c.head == "implicit":
            self.trainer = build_implicit_trainer(
                self.model,
                self.tokenizer,
                [p for _, p in train],
                [p for _, p in held_out],
                c,
                out,
                ctx.seed,
                ctx.device,
                ctx.precision,
                ctx.report_to,
            )
        else:  # TRL's own length filter then finds nothing to drop
            eval_ds = pairs_dataset([r for r, _ in held_out], c.use_margin) if held_out else None
            self.trainer = build_trainer(
                self.model,
                self.tokenizer,
                pairs_dataset([r for r, _ in train], c.use_margin),
                eval_ds,
                c,
                out,
                ctx.seed,
                ctx.device,
                ctx.precision,
                ctx.report_to,
            )
        metrics = {
            "train_pairs": len(self.trainer.train_dataset),
            "train_pairs_too_long": len(self.train_rows) - len(self.trainer.train_dataset),
        }
        metrics.update(train_from_last_checkpoint(self.trainer, self.ctx.dir / "checkpoints", self.log, self.ctx.name))
        evals = [e for e in self.trainer.state.log_history if "eval_loss" in e]
        if evals:
            metrics["trainer_eval_accuracy"] = round(evals[-1].get("eval_accuracy", float("nan")), 4)
        return metrics

    def save(self) -> dict:
        """Write model/ atomically; then (rank 0) reload it through the scoring API and measure."""
        c, ctx = self.cfg, self.ctx
        self.tokenizer.padding_side = "right"
        auc_samples = self.auc_samples()  # every rank: vLLM engines colocated with the ranks sample together
        head = (lambda partial: write_reward_head(partial, c.beta)) if c.head == "implicit" else None
        # a scorer: no generation config
        final = save_trained_model(
            ctx,
            self.trainer,
            self.tokenizer,
            ctx.precision,
            merge_lora=c.lora.enabled,
            generation=False,
            before_finish=head,
        )
        metrics = {}
        if ctx.is_main:
            history = self.trainer.state.log_history
            plot_curves(
                curves_from_log_history(history, ["loss", "accuracy", "eval_loss", "eval_accuracy"]),
                ctx.dir / "curves.png",
                title="Reward model",
            )
            end_sharded_init()
            metrics = self.evaluate(final, auc_samples)
            metrics["device"], metrics["precision"] = str(ctx.device), ctx.precision
            atomic_write_json(ctx.dir / "metrics.json", {"log_history": history, **metrics})
        finish_trainer_stage(ctx, self.trainer, c.keep_checkpoints)
        return metrics

    def evaluate(self, model_dir: Path, auc_samples: tuple) -> dict:
        """Held-out pair metrics and the verifier AUC (of `auc_samples`), scored by the saved model via the
        scoring API."""
        scorer = Scorer(
            ScoringConfig(batch_size=self.cfg.score_batch_size),
            reward_model_dir=str(model_dir),
            device=self.ctx.device,
            precision=self.ctx.precision,
        )
        metrics = {}
        if self.eval_rows:
            chosen, rejected = score_pairs(scorer, self.eval_rows)
            metrics["heldout"] = pair_metrics(chosen, rejected)
            sources = [":".join(str(r[k]) for k in ("source", "corruption") if k in r) for r in self.eval_rows]
            metrics["heldout_accuracy_per_source"] = {}
            # Pairs that say nothing of where they come from (a user's own preference set) get no breakdown.
            for src in sorted(set(sources) - {""}):
                mask = torch.tensor([s == src for s in sources])
                metrics["heldout_accuracy_per_source"][src] = pair_metrics(chosen[mask], rejected[mask])["accuracy"]
            plot_histogram(chosen.tolist(), rejected.tolist(), self.ctx.dir / "scores.png", "Held-out rewards")
        metrics["auc"] = self.verifier_auc(scorer, *auc_samples)
        return metrics

    def auc_samples(self) -> tuple[list[dict], list]:
        """The policy's samples of held-out prompts for the AUC check (every rank calls this)."""
        c, ctx = self.cfg.auc, self.ctx
        rows = _unique_prompts(self.eval_rows)[: c.prompts]
        if not rows:
            return rows, []
        policy = ctx.inputs.get("policy") or ctx.inputs["model"]
        sampling = c.sampling.model_copy(update={"seed": c.sampling.seed if c.sampling.seed is not None else ctx.seed})
        self.engine = make_engine(policy, sampling, ctx.device, ctx.precision, vllm=c.vllm, seed=ctx.seed)
        try:
            return rows, generate_all(self.engine, [r["prompt"] for r in rows], sampling)
        finally:
            self.cleanup()

    def verifier_auc(self, rm_scorer, rows: list[dict], samples: list) -> dict:
        """Label the policy's samples by the verifiers, and take the AUC of the reward model's scores."""
        c = self.cfg.auc
        if not rows:
            return {"auc": None, "note": "skipped: auc.prompts is 0 or there are no held-out pairs"}
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
        out = {
            "auc": None if auc is None else round(auc, 4),
            "samples": len(texts),
            "correct": sum(labels),
            "incorrect": len(labels) - sum(labels),
        }
        if auc is None:
            out["note"] = (
                "skipped: every sample is "
                + ("correct" if sum(labels) else "incorrect")
                + " by the verifiers, so there is nothing to rank"
            )
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
