"""ppo: policy optimisation against the scoring API with rollouts from the generation engine.

Per update (Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation details of RLHF with PPO"):
  generate -> score (+ missing end-of-turn penalty) -> reference and value forward -> per-token KL
  penalty with the score at the last token -> GAE (or RLOO over each prompt's samples, no value model)
  -> `ppo_epochs` of clipped policy and value updates
  over mini-batches (truncated importance weights correct for engine/trainer numerics) -> KL
  controller update -> push the new weights into the engine -> optional EMA anchor update (WARP).
Checkpoints every `save_every` updates; a re-run resumes from the last one.
"""
from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch

from ..algos import ppo as F
from ..algos.merge import ema_update
from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..launch import all_ranks_masked_moments, all_ranks_mean, barrier, trainable
from ..lora import add_adapters, lora_scalings, merged_state_dict
from ..data import prompt_of, read_rows
from ..manifest import atomic_write_json
from ..plots import plot_curves
from ..rollout import RolloutBatch, answer_batch, pack_rollout, token_logprobs, token_values
from .base import Stage
from .ppo_config import PPOConfig


class PPO(Stage):
    name = "ppo"
    Config = PPOConfig
    consumes = {"model": "model", "reward_model": "reward_model", "train_data": "train_data", "eval_data": "eval_data"}
    optional_inputs = {"reward_model", "eval_data"}
    produces = {"model": "model"}
    trains = True

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from ..generate import chat_prompt_ids
        from ..models import load_model, load_tokenizer
        from ..scoring import Scorer

        c, inp = self.cfg, self.ctx.inputs
        torch.manual_seed(self.seed)
        self.tokenizer = load_tokenizer(inp["model"])
        self.policy = load_model(inp["model"])
        # With LoRA the frozen base is the reference (adapters switched off) unless another is named.
        shared_reference = c.lora.enabled and c.reference is None and c.reference_mode == "fixed"
        self.reference = (None if shared_reference else
                          load_model(c.reference or inp["model"]).eval().requires_grad_(False))
        value_init = c.value_model or inp.get("reward_model") or inp["model"]
        # RLOO's baseline is the other samples of the same prompt: no value model at all.
        self.value = _load_value_model(value_init, self.tokenizer) if c.advantage == "gae" else None
        self.scorer = Scorer(c.scoring, reward_model_dir=inp.get("reward_model"))
        # Sharded or LoRA-wrapped training samples from a plain copy refreshed after every update.
        plain_policy = self.ctx.world_size == 1 and not c.lora.enabled
        self.rollout_model = self.policy if plain_policy else copy.deepcopy(self.policy).eval()
        self._add_adapters()
        self.rows = read_rows(inp["train_data"], seed=self.ctx.seed)
        self.eval_rows = read_rows(inp["eval_data"], seed=self.ctx.seed)[: c.eval_samples] if inp.get("eval_data") else []
        self.prompt_ids = [chat_prompt_ids(self.tokenizer, prompt_of(r)) for r in self.rows]
        self.handles = {"policy": trainable(self.policy, c.learning_rate, c.max_grad_norm, c.distributed,
                                            c.mini_batch_size)}
        if self.value is not None:
            self.handles["value"] = trainable(self.value, c.value_learning_rate, c.max_grad_norm, c.distributed,
                                              c.mini_batch_size)
            self.value = self.handles["value"].module
        self.policy_h = self.handles["policy"]
        self.policy = self.policy_h.module
        self.kl_ctl = (F.AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.adaptive_kl
                       else F.FixedKLController(c.kl_coef))
        self.order = list(range(len(self.rows)))
        random.Random(self.seed).shuffle(self.order)
        self.cursor, self.start_update, self.history = 0, 0, []
        self._resume()
        self.engine = self._make_engine(inp["model"])
        if self.start_update:
            self._sync_engine()  # resumed: the engine starts from the checkpoint's weights

    def _add_adapters(self) -> None:
        c = self.cfg
        if c.lora.enabled:
            self.policy = add_adapters(self.policy, c.lora, "CAUSAL_LM")
        self.lora_scalings = lora_scalings(self.policy) if c.lora.enabled else {}
        if c.value_lora.enabled and self.value is not None:
            if isinstance(self.value, ValueModel):
                raise ValueError("ppo.value_lora: not supported for recurrent_gemma value models; "
                                 "set ppo.value_lora.enabled=false")
            self.value = add_adapters(self.value, c.value_lora, "SEQ_CLS")

    @property
    def temperature(self) -> float:
        """The sampling temperature; PPO's logprobs are those of the distribution sampled from."""
        return self.cfg.sampling.temperature or 1.0

    @property
    def seed(self) -> int:
        return self.cfg.seed if self.cfg.seed is not None else self.ctx.seed

    def _make_engine(self, model_dir: str):
        """The rollout engine; vLLM holds its own copy of the weights (synced after every update)."""
        from ..generate import HFEngine

        if self.cfg.sampling.backend == "hf":
            return HFEngine(self.rollout_model, self.tokenizer)  # one process: the live policy itself
        from ..generate_vllm import VLLMEngine

        sampling = self.cfg.sampling
        return VLLMEngine(model_dir, seed=self.seed + self.ctx.rank, tensor_parallel_size=sampling.tensor_parallel_size,
                          gpu_memory_utilization=sampling.gpu_memory_utilization, **self.cfg.vllm)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.ctx.dir / "checkpoints")
        if ckpt is None:
            return
        if self.policy_h.distributed:
            for name, handle in self.handles.items():
                handle.load_checkpoint(ckpt / name)
            meta = load_checkpoint(ckpt, self._frozen_models(), {})
        else:
            optimizers = {name: handle.optimizer for name, handle in self.handles.items()}
            meta = load_checkpoint(ckpt, self._checkpoint_models(), optimizers)
        self.start_update, self.cursor, self.order = meta["step"], meta["cursor"], meta["order"]
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        self.scorer.moments.load_state_dict(meta["reward_moments"])
        self.history = meta["history"]
        (self.ctx.dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))
        self.log.info("[ppo] resumed from %s (update %d)", ckpt, self.start_update)

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        from tqdm import tqdm

        metrics = {}
        if self.eval_rows and not self.start_update and self.ctx.is_main:
            metrics["accuracy_before"] = self._evaluate()
        bar = tqdm(range(self.start_update, self.cfg.updates), desc="ppo", initial=self.start_update,
                   total=self.cfg.updates, disable=not self.ctx.is_main)
        for update in bar:
            stats = self._update(update)
            self.history.append(stats)
            if self.ctx.is_main:
                _append_jsonl(self.ctx.dir / "metrics.jsonl", stats)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}", s=f"{stats['time/total']:.1f}")
            if (update + 1) % self.cfg.save_every == 0 and update + 1 < self.cfg.updates:
                self._checkpoint(update + 1)
        first, last = self.history[0], self.history[-1]
        if self.start_update:
            metrics["resumed_from_update"] = self.start_update
        metrics.update(updates=len(self.history), reward_first=first["reward"], reward_last=last["reward"],
                       kl_last=last["kl"], kl_coef=self.kl_ctl.value)
        return metrics

    def _next_prompts(self) -> list[int]:
        """The next rollout_batch_size prompts for this rank (ranks take consecutive slices)."""
        idx, per_rank = [], self.cfg.rollout_batch_size
        for _ in range(per_rank * self.ctx.world_size):
            if self.cursor >= len(self.order):
                random.Random(self.seed + len(self.history)).shuffle(self.order)
                self.cursor = 0
            idx.append(self.order[self.cursor])
            self.cursor += 1
        return idx[self.ctx.rank * per_rank:(self.ctx.rank + 1) * per_rank]

    def _update(self, update: int) -> dict:
        c, t0 = self.cfg, time.time()
        prompt_idx = self._next_prompts()
        sampling = c.sampling.model_copy(update={"seed": self.seed + update})
        per_prompt = self.engine.generate([prompt_of(self.rows[i]) for i in prompt_idx], sampling)
        # sampling.n completions per prompt, each its own rollout row
        idx = [i for i, group in zip(prompt_idx, per_prompt) for _ in group]
        samples = [s for group in per_prompt for s in group]
        rows = [self.rows[i] for i in idx]
        prompts = [prompt_of(r) for r in rows]
        t_gen = time.time()
        scores = self.scorer.score(prompts, [s.text for s in samples], rows, training=True)
        finished = torch.tensor([s.finished for s in samples])
        score = scores.total + c.missing_eot_penalty * (~finished).float()
        t_score = time.time()
        batch = pack_rollout([self.prompt_ids[i] for i in idx], samples, self.tokenizer.pad_token_id)
        roll = self._prepare(batch, score)
        train_stats = self._optimise(batch, roll)
        t_train = time.time()
        mean_kl = all_ranks_mean({"kl": roll["seq_kl"].mean().item()})["kl"]
        self.kl_ctl.update(mean_kl, len(idx) * self.ctx.world_size)
        sync_s = self._sync_engine()
        stats = {"update": update + 1, "reward": scores.total.mean().item(), "score": score.mean().item(),
                 **{f"reward/{k}": v.mean().item() for k, v in scores.parts.items()},
                 "kl": roll["seq_kl"].mean().item(), "kl_coef": self.kl_ctl.value,
                 "response_length": batch.response_mask.sum(1).mean().item(),
                 "finished": finished.float().mean().item(), "logprob_gap": roll["logprob_gap"], **train_stats,
                 "time/generate": t_gen - t0, "time/score": t_score - t_gen, "time/train": t_train - t_score,
                 "time/sync": sync_s, "time/total": time.time() - t0}
        stats = all_ranks_mean(stats)
        for key in ("reward", "kl", "policy_loss", "value_loss"):
            if key in stats and not torch.isfinite(torch.tensor(stats[key])):
                raise FloatingPointError(f"ppo update {update + 1}: {key} is {stats[key]}; stopping "
                                         f"(the last good checkpoint in {self.ctx.dir / 'checkpoints'} is kept)")
        return stats

    @torch.no_grad()
    def _prepare(self, batch: RolloutBatch, score: torch.Tensor) -> dict:
        """Old logprobs, reference logprobs, values, KL-shaped rewards, advantages and returns."""
        c, mask, temp = self.cfg, batch.response_mask, self.temperature
        self.policy.eval()
        old_logp, raw_logp = token_logprobs(self.policy, batch, temp, with_raw=True)
        old_logp, raw_logp = old_logp * mask, raw_logp * mask
        if self.reference is not None:
            ref_logp = token_logprobs(self.reference, batch, temp) * mask
        else:
            with self.policy.disable_adapter():  # LoRA: the base weights are the reference
                ref_logp = token_logprobs(self.policy, batch, temp) * mask
        kl = (F.kl_k1 if c.kl_estimator == "k1" else F.kl_k3)(old_logp, ref_logp) * mask
        if c.advantage == "rloo":  # the sequence's KL-penalised reward against its prompt's other samples
            seq_reward = score - self.kl_ctl.value * kl.sum(1)
            adv = F.rloo_advantages(seq_reward, c.sampling.n)[:, None] * mask
            values = returns = None
        else:
            values = token_values(self.value, batch) * mask
            rewards = F.token_rewards(score, kl, mask, self.kl_ctl.value)
            adv, returns = F.gae(rewards, values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            adv = F.masked_whiten(adv, mask, moments=all_ranks_masked_moments(adv, mask))  # whole batch, all ranks
        # Engines report raw (T=1) logprobs, so the engine/trainer comparison uses raw ones too.
        is_weight = F.truncated_is_weight(raw_logp, batch.engine_logprobs, c.is_cap) if c.is_cap else None
        gap = (F.masked_mean((raw_logp - batch.engine_logprobs).abs(), mask).item()
               if batch.engine_logprobs.abs().sum() > 0 else 0.0)
        return {"old_logp": old_logp, "values": values, "adv": adv, "returns": returns, "is_weight": is_weight,
                "seq_kl": (kl * mask).sum(1), "logprob_gap": gap}

    def _optimise(self, batch: RolloutBatch, roll: dict) -> dict:
        c, n = self.cfg, batch.input_ids.shape[0]
        for handle in self.handles.values():
            handle.module.train()
        acc: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(self.seed + len(self.history))
        for _ in range(c.ppo_epochs):
            for idx in torch.randperm(n, generator=gen).split(c.mini_batch_size):
                mb, mask = batch.select(idx), batch.response_mask[idx]
                logp, entropy = token_logprobs(self.policy, mb, self.temperature, with_entropy=True)
                is_w = roll["is_weight"][idx] if roll["is_weight"] is not None else None
                pg_loss, clipfrac, approx_kl = F.policy_loss_clipped(logp, roll["old_logp"][idx], roll["adv"][idx],
                                                                     mask, c.clip_eps, is_w)
                stats = {"policy_loss": pg_loss, "clip_fraction": clipfrac, "approx_kl": approx_kl,
                         "entropy": F.masked_mean(entropy.detach(), mask)}
                loss = pg_loss
                if c.ptx_coef:  # InstructGPT eq. 2: minus gamma * log-likelihood of reference answers
                    pick = torch.randint(len(self.rows), (c.ptx_batch_size,), generator=gen).tolist()
                    ptx = answer_batch(self.tokenizer, [self.rows[i] for i in pick])
                    stats["ptx_loss"] = -F.masked_mean(token_logprobs(self.policy, ptx), ptx.response_mask)
                    loss = pg_loss + c.ptx_coef * stats["ptx_loss"]
                if len(self.history) >= c.value_warmup_updates or self.value is None:
                    self.policy_h.step(loss)
                if self.value is not None:
                    values = token_values(self.value, mb)
                    stats["value_loss"], stats["value_clip_fraction"] = F.value_loss_clipped(
                        values, roll["values"][idx], roll["returns"][idx], mask, c.value_clip_eps)
                    self.handles["value"].step(stats["value_loss"])
                for k, v in stats.items():
                    acc.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))
        return {k: sum(v) / len(v) for k, v in acc.items()}

    def _sync_engine(self) -> float:
        """After an update: gather the policy's weights (ZeRO-3: all ranks), push them into the rollout
        engine or copy, and move the EMA anchor (WARP) toward them. Returns the seconds spent."""
        t = time.time()
        vllm = hasattr(self.engine, "load_weights")
        if not (vllm or self.rollout_model is not self.policy or self.cfg.reference_mode == "ema"):
            return 0.0  # one process, HF backend, no LoRA: the engine samples from the live policy
        full = self.policy_h.full_state_dict()
        if self.lora_scalings:
            full = merged_state_dict(full, self.lora_scalings)  # what the engine serves: adapters folded in
        if vllm:
            self.engine.load_weights(full.items())
        if self.rollout_model is not self.policy:  # the plain copy evaluation and save() use
            self.rollout_model.load_state_dict(full)
        if self.cfg.reference_mode == "ema":
            with torch.no_grad():
                for name, ref_t in self.reference.state_dict().items():
                    ref_t.copy_(ema_update(ref_t, full[name], self.cfg.ema_rate))
        return time.time() - t

    def _frozen_models(self) -> dict:
        """What a checkpoint keeps besides policy and value: the reference (it moves in EMA mode)."""
        return {"reference": self.reference} if self.reference is not None else {}

    def _checkpoint_models(self) -> dict:
        return {**{name: handle.module for name, handle in self.handles.items()}, **self._frozen_models()}

    def _checkpoint(self, step: int) -> None:
        meta = {"cursor": self.cursor, "order": self.order, "kl_controller": self.kl_ctl.state_dict(),
                "reward_moments": self.scorer.moments.state_dict(), "history": self.history}
        folder = self.ctx.dir / "checkpoints"
        if not self.policy_h.distributed:
            optimizers = {name: handle.optimizer for name, handle in self.handles.items()}
            save_checkpoint(folder, step, self._checkpoint_models(), optimizers, meta)
            return
        # Sharded: each rank writes its DeepSpeed shards into a staging dir; rank 0 then adds the
        # reference and state.json (which marks the checkpoint complete) and renames it into place.
        staging = folder / f".step-{step:06d}.partial"
        for name, handle in self.handles.items():
            handle.save_checkpoint(staging / name)
        barrier()
        if self.ctx.is_main:
            save_checkpoint(folder, step, self._frozen_models(), {}, meta, extra_dir=staging)
        barrier()

    def _evaluate(self) -> dict:
        """Held-out prompts: greedy answers (oracle accuracy per task, mean reward), and the objective PPO
        raises, the mean reward of `eval_samples_per_prompt` samples from the rollout distribution."""
        from ..generate import HFEngine, greedy_texts
        from ..tasks import answer_accuracy

        rows, c = self.eval_rows, self.cfg
        prompts = [prompt_of(r) for r in rows]
        texts = greedy_texts(self.rollout_model, self.tokenizer, prompts, c.sampling.max_new_tokens)
        out = answer_accuracy(rows, texts) if all("answer" in r for r in rows) else {}
        out["reward"] = round(self.scorer.score(prompts, texts, rows).total.mean().item(), 4)
        if c.eval_samples_per_prompt:
            sampling = c.sampling.model_copy(update={"n": c.eval_samples_per_prompt, "seed": self.seed})
            groups = HFEngine(self.rollout_model, self.tokenizer).generate(prompts, sampling)
            k = c.eval_samples_per_prompt
            sampled = self.scorer.score([p for p in prompts for _ in range(k)], [s.text for g in groups for s in g],
                                        [r for r in rows for _ in range(k)])
            out["sampled_reward"] = round(sampled.total.mean().item(), 4)
            out.update({f"sampled_{name}": round(v.mean().item(), 4) for name, v in sampled.parts.items()})
        return out

    # ------------------------------------------------------------------ save
    def save(self) -> dict:
        from ..models import save_model_dir

        if self.policy_h.distributed:
            self._sync_engine()  # collective: the rollout copy now holds the final weights
        if hasattr(self.engine, "close"):
            self.engine.close()  # free the vLLM engine (a later stage may start its own)
        if not self.ctx.is_main:
            return {}
        save_model_dir(self.rollout_model, self.tokenizer, self.ctx.dir / "model")
        metrics = {"accuracy_after": self._evaluate()} if self.eval_rows else {}
        keys = [k for k in ("reward", "kl", "response_length", "value_loss", "clip_fraction", "entropy")
                if k in self.history[0]]
        plot_curves({k: [(h["update"], h[k]) for h in self.history] for k in keys}, self.ctx.dir / "curves.png", "PPO")
        times = {k: sum(h[k] for h in self.history) for k in self.history[0] if k.startswith("time/")}
        metrics["time_breakdown_s"] = {k.split("/")[1]: round(v, 2) for k, v in times.items()}
        atomic_write_json(self.ctx.dir / "summary.json", {**metrics, "history": self.history})
        return metrics


class ValueModel(torch.nn.Module):
    """A backbone with a scalar head, for families transformers has no sequence-classification
    class for (RecurrentGemma). Same attribute names as those classes: `base_model`, `score`."""

    def __init__(self, backbone, hidden_size: int):
        super().__init__()
        self.base_model = backbone
        self.score = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.score.weight)


def _load_value_model(path: str, tokenizer):
    """Per-token value model: a reward model (its head kept) or an LM with a new scalar head."""
    import json

    from ..models import load_model

    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    if model_type == "recurrent_gemma":
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(path, use_safetensors=True)
        return ValueModel(backbone, backbone.config.hidden_size)
    model = load_model(path, kind="reward")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


STAGE = PPO
