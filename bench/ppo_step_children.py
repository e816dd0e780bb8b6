"""The child processes of bench/ppo_step.py: one PPO run of our `ppo` stage or of TRL 1.12.0's
PPOTrainer, clocked per update (ppo_step.py's docstring says what is measured).

`ppo_step.py --child spec.json` calls `child_main`; the spec names the side, backend, models, prompts, PPO
settings, where TRL 1.12.0 is installed and the file to write the result to.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from childproc import status_mib

LORA = {"enabled": True, "r": 16, "alpha": 32}
"""ours-lora: adapters on every linear layer of policy and value (their own PPO learning rate as the
other sides')."""


def subprocess_peak_rss_mib() -> float:
    """Largest ru_maxrss among processes this child started and waited for (0 if none). An upper
    bound only: a helper forked from this process counts the RSS it inherited at the fork (vLLM
    forks one at start-up), so the table reports `peak_rss_mib` alone."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def cpu_clock(owner, method: str, into: list) -> None:
    """Wrap `owner.method` to append the process CPU seconds (all threads) of every call to `into`.
    On a shared machine wall time depends on what else runs; CPU time far less."""
    plain = getattr(owner, method)

    def clocked(*args, **kwargs):
        start = time.process_time()
        out = plain(*args, **kwargs)
        into.append(time.process_time() - start)
        return out

    setattr(owner, method, clocked)


def child_ours(spec: dict) -> dict:
    """Our ppo stage through the pipeline runner: wall times per phase from its metrics.jsonl, CPU
    times from clocks around its update, the engine's generate and the weight sync."""
    from posttrain.engines import HFEngine
    from posttrain.engines.vllm import VLLMEngine
    from posttrain.pipeline import load_pipeline, run_pipeline
    from posttrain.stages.ppo import PPO as PPOStage

    p = spec["ppo"]
    ppo = {
        "model": spec["policy"],
        "train_data": spec["train_data"],
        "value_model": spec["rm"],
        "scoring": {"reward_model": spec["rm"]},
        "sampling": {
            "backend": spec["backend"],
            "temperature": p["temperature"],
            "top_p": 1.0,
            "max_new_tokens": p["max_new_tokens"],
            "batch_size": p["rollout_batch_size"],
        },
        "updates": spec["updates"],
        "rollout_batch_size": p["rollout_batch_size"],
        "mini_batch_size": p["mini_batch_size"],
        "ppo_epochs": p["ppo_epochs"],
        "learning_rate": p["learning_rate"],
        "value_learning_rate": p["learning_rate"],
        "kl_coef": p["kl_coef"],
        "missing_eot_penalty": 0.0,
        "save_every": spec["updates"],
        "eval_samples": 0,
    }
    if spec["side"] == "ours-lora":  # LoRA on policy and value; the reference is the adapter-free base
        ppo["lora"] = ppo["value_lora"] = LORA
    cpu = {"total": [], "generate": [], "sync": [], "prepare": []}
    cpu_clock(PPOStage, "_update", cpu["total"])
    cpu_clock(PPOStage, "_prepare", cpu["prepare"])  # old-logprob, reference and value forwards + GAE
    cpu_clock(VLLMEngine if spec["backend"] == "vllm" else HFEngine, "generate", cpu["generate"])
    cpu_clock(VLLMEngine, "load_weights", cpu["sync"])
    run_dir = Path.cwd() / f"run-{spec['name']}"
    config = {"run_dir": str(run_dir), "seed": spec["seed"], "threads": spec["threads"], "stages": ["ppo"], "ppo": ppo}
    Path(f"{spec['name']}.yaml").write_text(json.dumps(config))  # JSON is YAML
    run_pipeline(load_pipeline(f"{spec['name']}.yaml"))
    history = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    cpu["sync"] = cpu["sync"] or [0.0] * len(history)  # HF rollouts sample the live policy: no sync
    if not all(len(v) == len(history) for v in cpu.values()):
        raise RuntimeError(f"{len(history)} updates but CPU clocks { ({k: len(v) for k, v in cpu.items()}) }")
    return {
        "updates": [
            {
                "total": h["time/total"],
                "generate": h["time/generate"],
                "sync": h["time/sync"],
                "score": h["time/score"],
                "train": h["time/train"],
                "tokens": h["response_length"] * p["rollout_batch_size"],
                "finished": h["finished"] * p["rollout_batch_size"],
                "cpu_total": cpu["total"][i],
                "cpu_generate": cpu["generate"][i],
                "cpu_sync": cpu["sync"][i],
                "cpu_prepare": cpu["prepare"][i],
            }
            for i, h in enumerate(history)
        ]
    }


def clock_generate(policy, stop_id: int) -> dict[str, list]:
    """Wrap `policy.generate` (what PPOTrainer samples with) to record, per call, wall and CPU seconds,
    completion tokens up to and including the first stop token, and how many completions stopped."""
    import torch

    calls = {"wall": [], "cpu": [], "tokens": [], "finished": []}
    plain_generate = policy.generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = plain_generate(*a, **kw)
        calls["wall"].append(time.perf_counter() - start)
        hit = out.sequences[:, kw["input_ids"].shape[1] :] == stop_id
        lengths = torch.where(hit.any(1), hit.int().argmax(1) + 1, hit.shape[1])
        calls["tokens"].append(int(lengths.sum()))
        calls["finished"].append(int(hit.any(1).sum()))
        return out

    policy.generate = timed_generate
    cpu_clock(policy, "generate", calls["cpu"])
    return calls


def trl_config(config_cls, spec: dict, stop_id: int):
    """PPOTrainer settings matching our stage's. per_device_train_batch_size = the whole rollout and no
    accumulation give one optimiser step per mini-batch, as ours takes (TRL steps once every
    gradient_accumulation_steps micro-batches)."""
    p, rollout = spec["ppo"], spec["ppo"]["rollout_batch_size"]
    return config_cls(
        output_dir="trl-out",
        per_device_train_batch_size=rollout,
        gradient_accumulation_steps=1,
        num_mini_batches=rollout // p["mini_batch_size"],
        num_ppo_epochs=p["ppo_epochs"],
        total_episodes=spec["updates"] * rollout,
        local_rollout_forward_batch_size=rollout,
        response_length=p["max_new_tokens"],
        temperature=p["temperature"],
        stop_token_id=stop_id,
        missing_eos_penalty=None,
        kl_coef=p["kl_coef"],
        kl_estimator="k1",
        learning_rate=p["learning_rate"],
        lr_scheduler_type="constant",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        num_sample_generations=0,
        seed=spec["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def child_trl(spec: dict) -> dict:
    """TRL 1.12.0's PPOTrainer on the same models and prompts; wall and CPU seconds per update from a
    callback at every step end."""
    sys.path.insert(0, spec["trl_dir"])  # ahead of the venv's trl 1.16
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    if trl.__version__ != spec["trl_version"] or not trl.__file__.startswith(spec["trl_dir"]):
        raise RuntimeError(
            f"expected trl {spec['trl_version']} from {spec['trl_dir']}, imported {trl.__version__} from {trl.__file__}"
        )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from posttrain.chat import END_OF_TURN
    from posttrain.data import prompt_of, read_conversations
    from posttrain.engines import chat_prompt_ids
    from posttrain.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(spec["policy"])
    tokenizer.padding_side = "left"  # PPOTrainer expects left-padded queries
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    dataset = Dataset.from_dict(
        {"input_ids": [chat_prompt_ids(tokenizer, prompt_of(r)) for r in read_conversations(spec["train_data"])]}
    )
    policy, reference = load_model(spec["policy"], device="cpu"), load_model(spec["policy"], device="cpu")
    reward = load_model(spec["rm"], kind="reward", device="cpu")
    value = load_model(spec["rm"], kind="reward", device="cpu")
    gen = clock_generate(policy, eot)
    if spec["side"] == "trl-nogc":
        import gc

        gc.collect = lambda *a, **kw: 0  # PPOTrainer calls it twice per update; automatic collection stays on

    marks: list[tuple[float, float]] = []  # (wall, CPU) at train begin and at every update's end

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append((time.perf_counter(), time.process_time()))

        on_step_end = on_train_begin

    trainer = PPOTrainer(
        args=trl_config(PPOConfig, spec, eot),
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(8)),
        callbacks=[StepClock()],
    )
    trainer.train()
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])]
    if not (len(steps) == len(gen["wall"]) == spec["updates"]):
        raise RuntimeError(f"expected {spec['updates']} updates, timed {len(steps)} and {len(gen['wall'])} rollouts")
    return {
        "trl_version": trl.__version__,
        "updates": [
            {
                "total": wall,
                "generate": gen["wall"][i],
                "sync": 0.0,
                "tokens": gen["tokens"][i],
                "finished": gen["finished"][i],
                "cpu_total": cpu,
                "cpu_generate": gen["cpu"][i],
                "cpu_sync": 0.0,
            }
            for i, (wall, cpu) in enumerate(steps)
        ],
    }


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])  # before vLLM starts: it makes set_num_threads a no-op
    start = time.perf_counter()
    result = (child_trl if spec["side"].startswith("trl") else child_ours)(spec)
    result.update(
        peak_rss_mib=status_mib("VmHWM"),
        subprocess_peak_rss_mib=subprocess_peak_rss_mib(),
        threads_at_end=torch.get_num_threads(),
        run_seconds=time.perf_counter() - start,
    )
    Path(spec["result"]).write_text(json.dumps(result))
    print(f"child {spec['name']} done: peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
