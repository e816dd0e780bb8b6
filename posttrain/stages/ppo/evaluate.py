"""The RL stage's held-out check, before the first update and after the last."""

from __future__ import annotations

from ...data import prompt_of
from ...engines import HFEngine, greedy_texts


def evaluate_policy(model, tokenizer, scorer, rows: list[dict], cfg, precision: str, seed: int) -> dict:
    """Held-out prompts: greedy answers (oracle accuracy per task, mean reward), and the objective RL
    raises, the mean reward of `cfg.eval_samples_per_prompt` samples from the rollout distribution."""
    from ...tasks import answer_accuracy

    prompts = [prompt_of(r) for r in rows]
    texts = greedy_texts(model, tokenizer, prompts, cfg.sampling.max_new_tokens, precision)
    out = answer_accuracy(rows, texts) if all("answer" in r for r in rows) else {}
    out["reward"] = round(scorer.score(prompts, texts, rows).total.mean().item(), 4)
    k = cfg.eval_samples_per_prompt
    if k:
        sampling = cfg.sampling.model_copy(update={"n": k, "seed": seed})
        groups = HFEngine(model, tokenizer, precision).generate(prompts, sampling)
        sampled = scorer.score(
            [p for p in prompts for _ in range(k)],
            [s.text for g in groups for s in g],
            [r for r in rows for _ in range(k)],
        )
        out["sampled_reward"] = round(sampled.total.mean().item(), 4)
        out.update({f"sampled_{name}": round(v.mean().item(), 4) for name, v in sampled.parts.items()})
    return out
