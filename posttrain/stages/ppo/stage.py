"""ppo: RL against the scoring API with rollouts from the generation engine — PPO with a value model,
or critic-free RLOO and the GRPO family (GRPO, DAPO, Dr. GRPO, GSPO), chosen by the config.

Per update (Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation details of RLHF with PPO";
Shao et al. 2024 for GRPO; Yu et al. 2025 for DAPO):
  generate (dynamic sampling: refill groups that all score alike) -> score (+ end-of-turn and overlong
  penalties) -> rollout-policy, reference and value forwards -> KL in the reward, in the loss, or off ->
  advantages (GAE, RLOO or group-normalised) -> `ppo_epochs` of clipped policy (token or sequence ratio)
  and value updates over mini-batches (truncated importance weights correct engine/trainer numerics) ->
  KL controller -> push the new weights into the engine -> optional EMA anchor update (WARP).
With one optimiser step per rollout the rollout-policy forward is skipped: its logprobs are the training
forward's own. Checkpoints every `save_every` updates; a re-run resumes from the last one.

Devices and precision come from the stage context: every model and batch lives on `ctx.device`; trained
models keep fp32 master weights and run forward passes under autocast; the reference and the rollout copy
are held in the precision's dtype; logprobs, KL and advantages are fp32; an EMA anchor accumulates in fp32.
"""

from __future__ import annotations

import copy
import json
import random
import time

import torch

from ...algos import ppo as F
from ...checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ...data import prompt_of, read_rows
from ...dist.rank import all_ranks_masked_moments, all_ranks_mean, autocast, barrier, torch_dtype
from ...dist.rank import host_memory_release_pays, release_host_memory
from ...dist.trainable import trainable
from ...engines import make_engine
from ...lora import add_adapters, lora_scalings
from ...manifest import atomic_write_json, atomic_write_text
from ...models import enable_gradient_checkpointing, load_model, load_tokenizer
from ...chat import chat_prompt_ids
from ...plots import plot_curves
from ...rollout import RolloutBatch, answer_batch, pack_rollout, token_logprobs, token_values
from ...scoring import Scorer
from ...tracking import Tracker
from ..base import Stage
from .config import PPOConfig
from .evaluate import evaluate_policy
from .groups import SampledGroups, sample_groups
from .update import Rollout, critic_free_advantages, policy_objective, sequence_rewards_with_kl
from .value import ValueModel, load_value_model
from .reference import Reference
from .weights import move_anchor, push_weights, served_weights


class PPO(Stage):
    name = "ppo"
    Config = PPOConfig
    consumes = {"model": "model", "reward_model": "reward_model", "train_data": "train_data", "eval_data": "eval_data"}
    optional_inputs = {"reward_model", "eval_data"}
    produces = {"model": "model"}
    trains = True

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        c, inp, dev = self.cfg, self.ctx.inputs, self.ctx.device
        torch.manual_seed(self.seed)
        self.tokenizer = load_tokenizer(inp["model"])
        self.policy = load_model(inp["model"], device=dev, dtype=torch.float32)  # fp32 master weights
        self._load_reference()
        value_init = c.value_model or inp.get("reward_model") or inp["model"]
        # RLOO's and GRPO's baselines are the other samples of the same prompt: no value model at all.
        self.value = load_value_model(value_init, self.tokenizer, dev) if c.advantage == "gae" else None
        if c.gradient_checkpointing:
            for model in (self.policy, self.value):
                if model is not None:
                    enable_gradient_checkpointing(model, "ppo.gradient_checkpointing")
        self.scorer = Scorer(
            c.scoring, reward_model_dir=inp.get("reward_model"), device=dev, precision=self.ctx.precision
        )
        # Sharded or LoRA-wrapped training samples (HF) and evaluates from a plain copy refreshed after every
        # update; with vLLM only rank 0 needs one (evaluation and the saved model).
        plain_policy = self.ctx.world_size == 1 and not c.lora.enabled
        wants_copy = c.sampling.backend == "hf" or self.ctx.is_main
        self.rollout_model = (
            self.policy if plain_policy else copy.deepcopy(self.policy).to(self.dtype).eval() if wants_copy else None
        )
        self._add_adapters()
        self.rows = read_rows(inp["train_data"], "conversation" if c.ptx_coef else "prompt", seed=self.ctx.seed)
        self.eval_rows = (
            read_rows(inp["eval_data"], "prompt", seed=self.ctx.seed)[: c.eval_samples] if inp.get("eval_data") else []
        )
        name = self.ctx.name
        for rows, key in ((self.rows, "train_data"), (self.eval_rows, "eval_data")):  # each named on its own
            if rows:  # before any rollout: a rule reading a column the rows lack fails now
                self.scorer.check_rows(rows, f"{name}.{key}", f"{name}.scoring", rm_stage=True)
        self.prompt_ids = [chat_prompt_ids(self.tokenizer, prompt_of(r)) for r in self.rows]
        settings = (c.max_grad_norm, c.distributed, c.mini_batch_size, self.ctx.precision)
        self.handles = {"policy": trainable(self.policy, c.learning_rate, *settings)}
        if self.value is not None:
            self.handles["value"] = trainable(self.value, c.value_learning_rate, *settings)
            self.value = self.handles["value"].module
        self.policy_h = self.handles["policy"]
        self.policy = self.policy_h.module
        self.releases_host_memory = host_memory_release_pays(self.policy)
        self.kl_ctl = (
            F.AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon)
            if c.adaptive_kl
            else F.FixedKLController(c.kl_coef if c.kl_mode != "off" else 0.0)  # off: no KL term, so reported 0
        )
        self.order = list(range(len(self.rows)))
        random.Random(self.seed).shuffle(self.order)
        self.cursor, self.start_update, self.history, self.before = 0, 0, [], {}
        self._resume()
        self.tracker = Tracker(
            self.ctx.report_to,
            self.ctx.dir,
            c.model_dump(mode="json"),
            enabled=self.ctx.is_main,
            first_step=self.start_update + 1,  # update u logs step u + 1
        )
        self.engine = make_engine(
            inp["model"],
            c.sampling,
            dev,
            self.ctx.precision,
            vllm=c.vllm,
            model=self.rollout_model,
            tokenizer=self.tokenizer,
            seed=self.seed,
            shares_gpu_with_training=True,
        )
        if self.start_update:
            self._push_weights(self._served_weights())  # resumed: the engine serves the checkpoint's weights

    def _load_reference(self) -> None:
        """The KL anchor: a frozen model in the precision's dtype, the policy itself with its LoRA adapters
        off, or none when no KL is used. In EMA mode an fp32 anchor accumulates beside it."""
        c, inp = self.cfg, self.ctx.inputs
        self.reference, self.anchor = None, None
        shared = c.lora.enabled and c.reference is None and c.reference_mode == "fixed"
        if (c.uses_reference or c.reference_mode == "ema") and not shared:
            self.reference = Reference(c.reference or inp["model"], self.ctx.device, self.dtype, c.reference_placement)
        if c.reference_mode == "ema":
            start = (
                self.policy
                if c.reference is None
                else load_model(c.reference, device=self.ctx.device, dtype=torch.float32)
            )
            self.anchor = {k: v.detach().float().clone() for k, v in start.state_dict().items()}

    def _add_adapters(self) -> None:
        c = self.cfg
        if c.lora.enabled:
            self.policy = add_adapters(self.policy, c.lora, "CAUSAL_LM")
        self.lora_scalings = lora_scalings(self.policy) if c.lora.enabled else {}
        if c.value_lora.enabled and self.value is not None:
            if isinstance(self.value, ValueModel):
                raise ValueError(
                    "ppo.value_lora: not supported for recurrent_gemma value models; set ppo.value_lora.enabled=false"
                )
            self.value = add_adapters(self.value, c.value_lora, "SEQ_CLS")

    @property
    def temperature(self) -> float:
        """The sampling temperature; the loss's logprobs are those of the distribution sampled from."""
        return self.cfg.sampling.temperature or 1.0

    @property
    def seed(self) -> int:
        return self.cfg.seed if self.cfg.seed is not None else self.ctx.seed

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of inference-only copies (reference, rollout copy) and of the saved model."""
        return torch_dtype(self.ctx.precision)

    def _mixed(self):
        return autocast(self.ctx.device, self.ctx.precision)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.ctx.dir / "checkpoints")
        if ckpt is None:
            return
        anchor = {"anchor": self.anchor} if self.anchor is not None else {}
        if self.policy_h.distributed:
            for name, handle in self.handles.items():
                handle.load_checkpoint(ckpt / name)
            meta = load_checkpoint(ckpt, {}, {}, anchor)
        else:
            optimizers = {name: handle.optimizer for name, handle in self.handles.items()}
            meta = load_checkpoint(ckpt, {n: h.module for n, h in self.handles.items()}, optimizers, anchor)
            for name, handle in self.handles.items():
                handle.load_extra_state(meta.get("handles", {}).get(name, {}))
        if self.anchor is not None:
            self.reference.load_state(self.anchor)
        self.start_update, self.cursor, self.order = meta["step"], meta["cursor"], meta["order"]
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        self.scorer.moments.load_state_dict(meta["reward_moments"])
        self.history, self.before = meta["history"], meta.get("before", {})
        if self.ctx.is_main:
            self._write_history()
        self.log.info("[ppo] resumed from %s (update %d)", ckpt, self.start_update)

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        from tqdm import tqdm

        if self.eval_rows and not self.start_update and self.ctx.is_main:
            self.before = {"accuracy_before": self._evaluate()}
        metrics = dict(self.before)  # a resumed run reports what the interrupted one measured before updating
        bar = tqdm(
            range(self.start_update, self.cfg.updates),
            desc="ppo",
            initial=self.start_update,
            total=self.cfg.updates,
            disable=not self.ctx.is_main,
        )
        for update in bar:
            stats = self._update(update)
            self.history.append(stats)
            if self.ctx.is_main:
                self._write_history()
                self.tracker.log(stats, update + 1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}", s=f"{stats['time/total']:.1f}")
            if (update + 1) % self.cfg.save_every == 0 and update + 1 < self.cfg.updates:
                self._checkpoint(update + 1)
        first, last = self.history[0], self.history[-1]
        if self.start_update:
            metrics["resumed_from_update"] = self.start_update
        metrics.update(
            updates=len(self.history),
            reward_first=first["reward"],
            reward_last=last["reward"],
            kl_last=last["kl"],
            kl_coef=self.kl_ctl.value,
        )
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
        return idx[self.ctx.rank * per_rank : (self.ctx.rank + 1) * per_rank]

    def _sample_groups(self, update: int) -> SampledGroups:
        try:
            return sample_groups(self.cfg, self.engine, self.scorer, self.rows, self._next_prompts, self.seed + update)
        except FloatingPointError as err:
            raise FloatingPointError(f"ppo update {update + 1}: {err}; stopping ({self._kept()})") from None

    def _kept(self) -> str:
        """What a run stopped for a non-finite value leaves to resume from."""
        ckpt = latest_checkpoint(self.ctx.dir / "checkpoints")
        if ckpt is None:
            return "no checkpoint was saved before it; a rerun starts the stage over"
        return f"the last good checkpoint, {ckpt}, is kept: a rerun resumes from it"

    def _update(self, update: int) -> dict:
        c, t0 = self.cfg, time.time()
        idx, samples, reward, score, parts, counts = self._sample_groups(update)
        self.engine.sleep()  # GPUs: the trainer gets the engine's memory until the next generation
        self._release_host_memory()
        t_gen = time.time()
        batch = pack_rollout([self.prompt_ids[i] for i in idx], samples, self.tokenizer.pad_token_id, self.ctx.device)
        roll = self._prepare(batch, score)
        self._release_host_memory()
        t_score = time.time()
        train_stats = self._optimise(batch, roll)
        t_train = time.time()
        kl = roll.seq_kl.mean().item() if roll.seq_kl is not None else 0.0
        self.kl_ctl.update(all_ranks_mean({"kl": kl})["kl"], len(idx) * self.ctx.world_size)
        sync_s = self._sync_engine()
        finished = batch.finished.float()
        stats = {
            "update": update + 1,
            "reward": reward.mean().item(),
            "score": score.mean().item(),
            **{f"reward/{k}": v.mean().item() for k, v in parts.items()},
            "kl": kl,
            "kl_coef": self.kl_ctl.value,
            "response_length": batch.response_mask.sum(1).float().mean().item(),
            "finished": finished.mean().item(),
            "logprob_gap": roll.logprob_gap,
            **train_stats,
            "time/generate": t_gen - t0,
            "time/score": t_score - t_gen,
            "time/train": t_train - t_score,
            "time/sync": sync_s,
            "time/total": time.time() - t0,
        }
        if c.dynamic_sampling:
            stats.update({f"dynamic/{k}": float(v) for k, v in counts.items()})
        if self.anchor is not None:
            stats["anchor_step"] = self.anchor_step
        stats = {**all_ranks_mean(stats), "update": update + 1}
        if c.dynamic_sampling:  # counts of groups: every rank's, summed (a mean of counts is no count)
            stats.update({f"dynamic/{k}": round(stats[f"dynamic/{k}"] * self.ctx.world_size) for k in counts})
        for key in ("reward", "kl", "policy_loss", "value_loss"):
            if key in stats and not torch.isfinite(torch.tensor(stats[key])):
                raise FloatingPointError(f"ppo update {update + 1}: {key} is {stats[key]}; stopping ({self._kept()})")
        return stats

    def _release_host_memory(self) -> None:
        """Between generation, scoring, the training forward and its backward pass, where it pays: each
        leaves freed heap pages that the next phase's large gradients cannot reuse."""
        if self.releases_host_memory:
            release_host_memory()

    def _single_step(self, rows: int) -> bool:
        """One optimiser step per rollout, with nothing before it that needs the rollout policy's logprobs:
        the training forward's logprobs then are the rollout policy's, and the no-grad forward is skipped."""
        c = self.cfg
        return c.ppo_epochs == 1 and c.mini_batch_size >= rows and not (c.kl_mode == "reward" and c.uses_reference)

    @torch.no_grad()
    def _prepare(self, batch: RolloutBatch, score: torch.Tensor) -> Rollout:
        """Rollout-policy and reference logprobs, values, KL-shaped rewards, advantages and returns."""
        c, mask, temp = self.cfg, batch.response_mask, self.temperature
        score = score.to(mask.device)
        old_logp = raw_logp = ref_logp = kl = None
        self.policy.eval()
        with self._mixed():
            if not self._single_step(mask.shape[0]):
                old_logp, raw_logp = token_logprobs(self.policy, batch, temp, with_raw=True)
            if c.uses_reference:
                ref_logp = self._reference_logprobs(batch)
        if old_logp is not None and ref_logp is not None:
            kl = (F.kl_k1 if c.kl_estimator == "k1" and c.kl_mode == "reward" else F.kl_k3)(old_logp, ref_logp) * mask
        values = returns = None
        if c.advantage == "gae":
            with self._mixed():
                values = token_values(self.value, batch) * mask
            rewards = F.token_rewards(
                score,
                kl if c.kl_mode == "reward" and kl is not None else torch.zeros_like(mask),
                mask,
                self.kl_ctl.value,
            )
            adv, returns = F.gae(rewards, values, mask, c.gamma, c.lam)
        else:
            adv = critic_free_advantages(sequence_rewards_with_kl(score, kl, self.kl_ctl.value, c), mask, c)
        if c.whitens:
            adv = F.masked_whiten(adv, mask, moments=all_ranks_masked_moments(adv, mask))  # whole batch, all ranks
        roll = Rollout(
            batch=batch,
            score=score,
            adv=adv,
            old_logp=old_logp,
            ref_logp=ref_logp,
            values=values,
            returns=returns,
            seq_kl=None if kl is None else kl.sum(1),
        )
        if raw_logp is not None:
            self._engine_mismatch(roll, raw_logp, batch)
        return roll

    def _engine_mismatch(self, roll: Rollout, raw_logp: torch.Tensor, batch: RolloutBatch) -> None:
        """Importance weights and the logprob gap against the engine's own logprobs (raw, T=1), when it
        reported them (vLLM; HF samples from the trained weights themselves)."""
        mask = batch.response_mask
        if not batch.engine_logprobs.abs().sum() > 0:
            return
        if self.cfg.is_cap:
            roll.is_weight = F.truncated_is_weight(raw_logp * mask, batch.engine_logprobs, self.cfg.is_cap)
        roll.logprob_gap = F.masked_mean((raw_logp - batch.engine_logprobs).abs(), mask).item()

    def _reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        if self.reference is not None:
            with self.reference.scoring() as reference:
                return token_logprobs(reference, batch, self.temperature)
        with self.policy.disable_adapter():  # LoRA: the base weights are the reference
            return token_logprobs(self.policy, batch, self.temperature)

    def _optimise(self, batch: RolloutBatch, roll: Rollout) -> dict:
        c, n = self.cfg, batch.input_ids.shape[0]
        for handle in self.handles.values():
            handle.module.train()
        acc: dict[str, list[float]] = {}
        gen = torch.Generator().manual_seed(self.seed + len(self.history))
        wants_raw = roll.old_logp is None and batch.engine_logprobs.abs().sum() > 0
        for _ in range(c.ppo_epochs):
            for idx in torch.randperm(n, generator=gen).split(c.mini_batch_size):
                idx = idx.to(batch.input_ids.device)
                mb, mask, rows = batch.select(idx), batch.response_mask[idx], roll.rows(idx)
                with self._mixed():
                    logp, entropy, *raw = token_logprobs(
                        self.policy, mb, self.temperature, with_entropy=True, with_raw=wants_raw
                    )
                if roll.old_logp is None:  # the single step: these logprobs are the rollout policy's
                    self._first_forward_stats(roll, logp.detach(), raw[0].detach() if raw else None, rows, mb)
                loss, stats = policy_objective(c, logp, rows, mask, self.kl_ctl.value)
                stats["entropy"] = F.masked_mean(entropy.detach(), mask)
                if c.ptx_coef:  # InstructGPT eq. 2: minus gamma * log-likelihood of reference answers
                    pick = torch.randint(len(self.rows), (c.ptx_batch_size,), generator=gen).tolist()
                    ptx = answer_batch(self.tokenizer, [self.rows[i] for i in pick], self.ctx.device)
                    with self._mixed():
                        stats["ptx_loss"] = -F.masked_mean(token_logprobs(self.policy, ptx), ptx.response_mask)
                    loss = loss + c.ptx_coef * stats["ptx_loss"]
                if len(self.history) >= c.value_warmup_updates or self.value is None:
                    self._release_host_memory()  # the forward's freed temporaries, before the backward
                    self.policy_h.step(loss)
                if self.value is not None:
                    with self._mixed():
                        values = token_values(self.value, mb)
                    stats["value_loss"], stats["value_clip_fraction"] = F.value_loss_clipped(
                        values, rows["values"], rows["returns"], mask, c.value_clip_eps
                    )
                    self.handles["value"].step(stats["value_loss"])
                for k, v in stats.items():
                    acc.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))
        return {k: sum(v) / len(v) for k, v in acc.items()}

    def _first_forward_stats(
        self, roll: Rollout, logp: torch.Tensor, raw: torch.Tensor | None, rows: dict, mb: RolloutBatch
    ) -> None:
        """Single-step mode: what `_prepare` would have computed from a separate rollout-policy forward."""
        rows["old_logp"] = logp
        if rows["ref_logp"] is not None:
            roll.seq_kl = (F.kl_k3(logp, rows["ref_logp"]) * mb.response_mask).sum(1)
        if raw is not None:
            self._engine_mismatch(roll, raw, mb)
            rows["is_weight"] = roll.is_weight

    # ------------------------------------------------------------------ weights: engine, copy, anchor
    def _served_weights(self) -> dict:
        return served_weights(self.policy_h, self.lora_scalings)

    def _push_weights(self, full: dict) -> None:
        push_weights(self.engine, self.rollout_model, self.policy, full)

    def _sync_engine(self) -> float:
        """After an update: push the new weights into the rollout engine or copy, and move the EMA anchor
        (WARP) toward them. Returns the seconds spent."""
        t = time.time()
        separate = hasattr(self.engine, "load_weights") or self.rollout_model is not self.policy
        if not (separate or self.anchor is not None):
            return 0.0  # one process, HF backend, no LoRA: the engine samples from the live policy
        full = self._served_weights()
        self._push_weights(full)
        if self.anchor is not None:
            self.anchor_step = move_anchor(self.anchor, full, self.cfg.ema_rate, self.reference)
        return time.time() - t

    def _checkpoint(self, step: int) -> None:
        meta = {
            "cursor": self.cursor,
            "order": self.order,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_moments": self.scorer.moments.state_dict(),
            "history": self.history,
            "before": self.before,
        }
        folder = self.ctx.dir / "checkpoints"
        anchor = {"anchor": self.anchor} if self.anchor is not None else {}
        if not self.policy_h.distributed:
            meta["handles"] = {name: handle.extra_state() for name, handle in self.handles.items()}
            optimizers = {name: handle.optimizer for name, handle in self.handles.items()}
            save_checkpoint(
                folder, step, {n: h.module for n, h in self.handles.items()}, optimizers, meta, tensors=anchor
            )
            return
        # Sharded: each rank writes its DeepSpeed shards into a staging dir; rank 0 then adds the anchor
        # and state.json (which marks the checkpoint complete) and renames it into place.
        staging = folder / f".step-{step:06d}.partial"
        for name, handle in self.handles.items():
            handle.save_checkpoint(staging / name)
        barrier()
        if self.ctx.is_main:
            save_checkpoint(folder, step, {}, {}, meta, extra_dir=staging, tensors=anchor)
        barrier()

    def _evaluate(self) -> dict:
        return evaluate_policy(
            self.rollout_model, self.tokenizer, self.scorer, self.eval_rows, self.cfg, self.ctx.precision, self.seed
        )

    def cleanup(self) -> None:
        super().cleanup()
        tracker, self.tracker = getattr(self, "tracker", None), None
        if tracker is not None:
            tracker.close()

    def _write_history(self) -> None:
        """metrics.jsonl, one line per update, rewritten whole (atomically) so a crash never leaves half a
        line or the lines of an abandoned attempt."""
        atomic_write_text(self.ctx.dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))

    # ------------------------------------------------------------------ save
    def save(self) -> dict:
        if self.policy_h.distributed:
            self._push_weights(self._served_weights())  # collective: the rollout copy gets the final weights
        super().cleanup()  # free the vLLM engine before evaluating (a later stage may start its own)
        if not self.ctx.is_main:
            return {}
        metrics = {"accuracy_after": self._evaluate()} if self.eval_rows else {}
        from ...models import save_model_dir

        save_model_dir(self.rollout_model, self.tokenizer, self.ctx.dir / "model", dtype=self.dtype)
        keys = [
            k
            for k in ("reward", "kl", "response_length", "value_loss", "clip_fraction", "entropy")
            if k in self.history[0]
        ]
        plot_curves({k: [(h["update"], h[k]) for h in self.history] for k in keys}, self.ctx.dir / "curves.png", "PPO")
        times = {k: sum(h[k] for h in self.history) for k in self.history[0] if k.startswith("time/")}
        metrics["time_breakdown_s"] = {k.split("/")[1]: round(v, 2) for k, v in times.items()}
        metrics["device"], metrics["precision"] = str(self.ctx.device), self.ctx.precision
        # train() reported the before-measurement to the manifest; the summary holds both sides of it.
        atomic_write_json(self.ctx.dir / "summary.json", {**self.before, **metrics, "history": self.history})
        return metrics


STAGE = PPO
