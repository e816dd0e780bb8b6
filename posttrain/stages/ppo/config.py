"""Config of the RL stage `ppo`: PPO with a value model (GAE), or critic-free RLOO and the GRPO family
(GRPO, DAPO, Dr. GRPO, GSPO) selected by `advantage` and the loss keys."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from ...config import DistributedConfig, ModelDir, LoraSection, Precision, Section, TrackingBackend
from ...data import DataSource
from ...engines import SamplingConfig, VLLMOptions
from ...scoring import ScoringConfig


class PPOConfig(Section):
    """Config of the ppo stage."""

    model: ModelDir = None
    """Policy to start from; default: the latest earlier stage's model (SFT)."""
    reference: ModelDir = None
    """Frozen reference for the KL penalty; default: the starting policy."""
    value_model: ModelDir = None
    """Value model init; default: the reward model if the pipeline has one, else the starting policy."""
    train_data: DataSource = None
    """Prompts (conversations: path, mapping or mixture; the final assistant turn is dropped); default: the data
    stage's train split."""
    eval_data: DataSource = None
    """Held-out prompts for accuracy before/after; default: the data stage's held-out split."""
    scoring: ScoringConfig = ScoringConfig()
    """Reward: reward model and/or rule rewards (weighted sum)."""
    sampling: SamplingConfig = SamplingConfig(backend="vllm", temperature=1.0, max_new_tokens=32)
    """Rollout sampling (backend: vllm, or hf for models vLLM does not run; n completions per prompt)."""
    vllm: VLLMOptions = VLLMOptions()
    """vLLM engine settings for sampling.backend=vllm (e.g. kv_cache_gib: 4, max_model_len: 2048)."""
    updates: int = Field(20, ge=1)
    """PPO iterations (rollout, then optimisation)."""
    rollout_batch_size: int = Field(64, ge=1)
    """Prompts per rollout (per process); each gets sampling.n completions."""
    mini_batch_size: int = Field(16, ge=1)
    """Sequences per optimiser step."""
    value_warmup_updates: int = Field(0, ge=0)
    """First N updates train only the value model (a fresh value head is a poor baseline at first)."""
    ppo_epochs: int = Field(2, ge=1)
    """Passes over each rollout."""
    learning_rate: float = Field(1e-5, gt=0)
    """Policy AdamW learning rate."""
    value_learning_rate: float = Field(1e-4, gt=0)
    """Value model AdamW learning rate."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global norm), per model."""
    kl_coef: float = Field(0.05, ge=0)
    """Initial coefficient of the KL term (beta)."""
    kl_mode: Literal["reward", "loss", "off"] = "reward"
    """reward: a per-token penalty in the reward (InstructGPT); loss: beta * k3 KL added to the policy loss
    (GRPO); off: no KL and no reference model at all."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward (Schulman 2020); kl_mode loss always uses k3."""
    adaptive_kl: bool = False
    """Adapt kl_coef toward kl_target (Ziegler et al. 2019)."""
    kl_target: float = Field(1.0, gt=0)
    """Target sequence KL for the adaptive controller."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive controller horizon (in sequences)."""
    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    """gae: a value model's per-token baseline (GAE); rloo: each sample's reward against the mean of its
    prompt's other sampling.n - 1 samples; grpo: against its group's mean, divided by the group's std
    (rloo and grpo need n >= 2 and load no value model)."""
    scale_by_std: bool = True
    """grpo: divide by the group's reward std (False: Dr. GRPO's unscaled advantages)."""
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    """How per-token losses become one: token_mean (DAPO), sequence_mean (GRPO), constant (Dr. GRPO:
    divided by sequences x sampling.max_new_tokens)."""
    ratio_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (PPO/GRPO), or one length-normalised ratio per sequence (GSPO; needs
    rloo or grpo advantages; its policy term is a mean over sequences, and loss_aggregation applies to the
    KL term only)."""
    clip_low: Optional[float] = Field(None, gt=0, lt=1)
    """Lower clip range eps_low (ratio >= 1 - eps_low); None: clip_eps."""
    clip_high: Optional[float] = Field(None, gt=0)
    """Upper clip range eps_high (ratio <= 1 + eps_high; DAPO's clip-higher uses 0.28); None: clip_eps."""
    dynamic_sampling: bool = False
    """Drop prompt groups whose samples all score alike and sample more prompts until the batch is full
    (DAPO); needs rloo or grpo."""
    dynamic_sampling_rounds: int = Field(4, ge=1)
    """Most generation rounds per update when dynamic sampling refills the batch."""
    overlong_cache: int = Field(0, ge=0)
    """DAPO's soft overlong penalty: completions within this many tokens of sampling.max_new_tokens lose up
    to 1 reward linearly, truncated ones lose 1 (0 = off)."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    clip_eps: float = Field(0.2, gt=0)
    """Policy ratio clip."""
    value_clip_eps: float = Field(0.2, gt=0)
    """Value prediction clip around the rollout's values."""
    whiten_advantages: Optional[bool] = None
    """Normalise advantages over the rollout's valid tokens (mean 0, std 1). None: yes for gae, no for rloo
    and grpo, whose group baselines it would undo (a group that scored alike gets a non-zero advantage, and
    Dr. GRPO's unscaled advantages get scaled)."""
    missing_eot_penalty: float = -1.0
    """Added to the score of a completion that did not end its turn (0 = off)."""
    is_cap: Optional[float] = Field(2.0, gt=0)
    """Truncated importance-sampling cap on exp(trainer_logp - engine_logp); None = no correction."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass of the policy (and value model): the
    activation memory of one layer instead of all, for about one more forward pass per step; the training
    forward then runs each sample's prompt itself instead of sharing it."""
    ptx_coef: float = Field(0.0, ge=0)
    """Weight of the likelihood of train_data's own answers in the policy loss (InstructGPT's PPO-ptx):
    it holds what the reward does not ask for; 0 = off."""
    ptx_batch_size: int = Field(16, ge=1)
    """Reference conversations per policy step for the ptx term."""
    reference_mode: Literal["fixed", "ema"] = "fixed"
    """KL anchor: the frozen starting policy, or an EMA of the policy (WARP)."""
    reference_placement: Literal["device", "cpu", "disk"] = "device"
    """Where the reference waits between its scoring forwards: on the training device; in host memory,
    moved to the accelerator only to score; or on disk, read again from its model directory for each
    scoring (frees its memory on any machine at one load per update; not with reference_mode ema)."""
    ema_rate: float = Field(0.01, gt=0, le=1)
    """WARP's mu: anchor <- (1 - mu) * anchor + mu * policy, every update."""
    save_every: int = Field(5, ge=1)
    """Checkpoint (policy, value, optimisers, RNG, data position, KL controller) every N updates."""
    eval_samples: int = Field(100, ge=0)
    """Held-out prompts answered greedily before and after for accuracy (0 = skip)."""
    eval_samples_per_prompt: int = Field(4, ge=0)
    """Completions sampled per held-out prompt (rollout temperature) for the sampled reward (0 = skip)."""
    seed: Optional[int] = None
    """Seed for data order and sampling; default: the pipeline seed."""
    lora: LoraSection = LoraSection()
    """LoRA on the policy: the reference is the policy with adapters off (no second copy) unless set,
    and the engine and the saved model get the adapters folded into full weights."""
    value_lora: LoraSection = LoraSection()
    """LoRA on the value model's backbone (its scalar head trains in full)."""
    distributed: DistributedConfig = DistributedConfig()
    """Processes and DeepSpeed ZeRO settings."""
    precision: Optional[Precision] = None
    """fp32, bf16 or fp16 for this stage; None: the pipeline's `precision`."""
    report_to: Optional[list[TrackingBackend]] = None
    """Experiment trackers logging every update's metrics ([] = none); None: the pipeline's `report_to`."""

    @field_validator("kl_mode", mode="before")
    @classmethod
    def _off_in_yaml(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _consistent(self):
        critic_free = self.advantage in ("rloo", "grpo")
        if critic_free and self.sampling.n < 2:
            raise ValueError(f"advantage {self.advantage!r} compares samples of one prompt: set sampling.n >= 2")
        if critic_free and self.sampling.temperature == 0:
            raise ValueError(
                f"advantage {self.advantage!r} compares the sampling.n samples of a prompt, and "
                "sampling.temperature 0 (greedy) makes them one answer: set a temperature above 0"
            )
        if self.ratio_level == "sequence" and not critic_free:
            raise ValueError(
                "ratio_level 'sequence' (GSPO) needs one advantage per sequence: set advantage to rloo or grpo"
            )
        if self.dynamic_sampling and not critic_free:
            raise ValueError("dynamic_sampling drops groups with no reward spread: set advantage to rloo or grpo")
        if self.overlong_cache > self.sampling.max_new_tokens:
            raise ValueError(
                f"overlong_cache ({self.overlong_cache}) exceeds sampling.max_new_tokens "
                f"({self.sampling.max_new_tokens})"
            )
        if self.kl_mode == "off" and (self.reference_mode == "ema" or self.adaptive_kl or self.reference):
            raise ValueError(
                "kl_mode 'off' uses no reference model: unset reference, reference_mode ema and "
                "adaptive_kl, or choose kl_mode reward or loss"
            )
        self._check_reference_placement()
        return self

    @property
    def whitens(self) -> bool:
        """Whether advantages are whitened over the batch (`whiten_advantages`, or its advantage's default)."""
        return self.advantage == "gae" if self.whiten_advantages is None else self.whiten_advantages

    def _check_reference_placement(self) -> None:
        if self.reference_placement == "device":
            return
        key = f"reference_placement {self.reference_placement!r}"
        if not (self.uses_reference or self.reference_mode == "ema"):
            raise ValueError(f"{key}: no KL term reads a reference, so there is none to place; set it to 'device'")
        if self.lora.enabled and self.reference is None and self.reference_mode == "fixed":
            raise ValueError(
                f"{key}: with LoRA the reference is the policy with its adapters off, not a copy to place; "
                "set it to 'device' (or name a separate `reference`)"
            )
        if self.reference_placement == "disk" and self.reference_mode == "ema":
            raise ValueError(
                "reference_placement 'disk' re-reads the starting reference, but reference_mode 'ema' moves it "
                "every update: use 'cpu' (on an accelerator) or 'device'"
            )

    @property
    def uses_reference(self) -> bool:
        """Whether any loss or reward reads the reference's logprobs."""
        return self.kl_mode != "off" and (self.kl_coef > 0 or self.adaptive_kl)
