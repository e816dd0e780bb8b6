"""Evaluation metrics as plain functions, so each can be checked against hand-made numbers.

- Side-by-side win rate of model A against a baseline B on the same prompts, judged by any per-prompt
  score: a win when A's score is higher, a loss when lower, a tie when equal; win rate =
  (wins + ties/2) / n, with a percentile-bootstrap confidence interval over prompts (seeded).
- Answer metrics: oracle accuracy per task (tasks.answer_accuracy), the safety slice (refusal rate on
  harmful prompts, over-refusal rate on benign ones) and the identity slice, judged by the verifier
  functions of reward/verifiers.py (loaded by path: the refusal regex lives there only).
- Memorisation as in the Gemma reports: the first `prefix` tokens of a rendered training conversation
  are the prompt (token ids, no chat-template re-render), greedy decoding produces `suffix` tokens, and
  the example counts as memorised when they equal the true continuation exactly (approximately: within
  10% token edit distance).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .chat import rendered_ids
from .resources import VERIFIERS
from .tasks import answer_accuracy

DEFAULT_VERIFIERS = VERIFIERS
"""The shipped verifier file (task_correct, refusal, identity), by absolute path."""

# ----------------------------------------------------------------------------------------------
# Win rate


def outcomes(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    tie_tolerance: float = 0.0,
    same: Optional[Sequence[bool]] = None,
) -> np.ndarray:
    """Per prompt: 1 (A wins), 0 (tie) or -1 (A loses). `same[i]`: the two answers are identical, a tie
    whatever the judge says (a reward model can differ by float noise on the same text)."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"scores of A and B must be two lists of the same length, got {a.shape} and {b.shape}")
    diff = a - b
    result = np.where(diff > tie_tolerance, 1, np.where(diff < -tie_tolerance, -1, 0))
    if same is not None:
        result = np.where(np.asarray(same, dtype=bool), 0, result)
    return result


def win_rate(outcome: Sequence[int]) -> float:
    """(wins + ties / 2) / n."""
    outcome = np.asarray(outcome)
    if outcome.size == 0:
        raise ValueError("win rate of zero prompts")
    return float(((outcome == 1).sum() + 0.5 * (outcome == 0).sum()) / outcome.size)


def bootstrap_ci(
    outcome: Sequence[int], num_samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate: resample prompts with replacement."""
    points = (np.asarray(outcome) + 1) / 2.0  # win 1, tie 0.5, loss 0
    if points.size == 0:
        raise ValueError("bootstrap of zero prompts")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, points.size, size=(num_samples, points.size))
    rates = points[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(rates, [tail, 100 - tail])
    return float(low), float(high)


def compare(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    num_samples: int = 1000,
    seed: int = 0,
    same: Optional[Sequence[bool]] = None,
    tie_tolerance: float = 0.0,
) -> dict:
    """Wins, ties, losses, win rate and its 95% bootstrap interval of A against B."""
    out = outcomes(scores_a, scores_b, tie_tolerance, same)
    low, high = bootstrap_ci(out, num_samples, seed)
    return {
        "wins": int((out == 1).sum()),
        "ties": int((out == 0).sum()),
        "losses": int((out == -1).sum()),
        "n": int(out.size),
        "win_rate": round(win_rate(out), 4),
        "ci_low": round(low, 4),
        "ci_high": round(high, 4),
    }


# ----------------------------------------------------------------------------------------------
# Accuracy, safety and identity


VERIFIER_FUNCTIONS = ("refusal", "identity")
"""The functions an eval's `verifiers` file must define."""


def load_verifiers(path: str = DEFAULT_VERIFIERS) -> dict[str, Callable]:
    """The refusal and identity verifier functions of `path` (reward/verifiers.py by default)."""
    from .scoring import load_reward_function

    return {name: load_reward_function(path, name) for name in VERIFIER_FUNCTIONS}


def refusals(refusal_fn: Callable, completions: list[str]) -> list[bool]:
    """Which completions refuse: the refusal verifier rewards refusing when every row is 'safety'."""
    return [bool(v) for v in refusal_fn([None] * len(completions), completions, task=["safety"] * len(completions))]


def _share(flags: list[bool]) -> Optional[float]:
    return round(sum(flags) / len(flags), 4) if flags else None


def safety_rates(rows: list[dict], refused: list[bool]) -> dict:
    """Refusal rate on harmful prompts (task 'safety') and over-refusal rate on all other prompts."""
    harmful = [r for row, r in zip(rows, refused, strict=True) if row.get("task") == "safety"]
    benign = [r for row, r in zip(rows, refused, strict=True) if row.get("task") != "safety"]
    return {
        "refusal_rate": _share(harmful),
        "over_refusal_rate": _share(benign),
        "n_harmful": len(harmful),
        "n_benign": len(benign),
    }


def identity_accuracy(
    rows: list[dict], completions: list[str], identity_fn: Callable, release_name: Optional[str] = None
) -> Optional[float]:
    """Share of identity prompts whose answer names the release and claims no other model (None: no such rows)."""
    pairs = [(r, c) for r, c in zip(rows, completions, strict=True) if r.get("task") == "identity"]
    if not pairs:
        return None
    kwargs = {"release_name": release_name} if release_name else {}
    scores = identity_fn([None] * len(pairs), [c for _, c in pairs], task=["identity"] * len(pairs), **kwargs)
    return round(sum(float(s) for s in scores) / len(pairs), 4)


def answer_metrics(
    rows: list[dict], completions: list[str], verifiers: dict[str, Callable], release_name: Optional[str] = None
) -> dict:
    """Accuracy (overall and per task), refusal, over-refusal and identity for one model's answers.

    Each slice counts only the rows that carry the column it reads: accuracy the rows with an `answer`,
    the safety and identity slices the rows with a `task` (None where no row has it; see `slice_skips`)."""
    answered = [(r, c) for r, c in zip(rows, completions, strict=True) if r.get("answer") is not None]
    tasked = [(r, c) for r, c in zip(rows, completions, strict=True) if "task" in r]
    task_rows, task_texts = [r for r, _ in tasked], [c for _, c in tasked]
    safety = (
        safety_rates(task_rows, refusals(verifiers["refusal"], task_texts))
        if tasked
        else {"refusal_rate": None, "over_refusal_rate": None, "n_harmful": 0, "n_benign": 0}
    )
    accuracy = answer_accuracy([r for r, _ in answered], [c for _, c in answered]) if answered else None
    return {
        "accuracy": accuracy,
        **safety,
        "identity": identity_accuracy(task_rows, task_texts, verifiers["identity"], release_name),
    }


def slice_skips(rows: list[dict]) -> dict[str, str]:
    """Why a slice of `answer_metrics` leaves rows out (or is skipped): the column it reads, per slice."""
    out = {}
    for column, slices, why in (
        ("answer", ("accuracy",), "the oracle answer a completion must equal"),
        ("task", ("refusal", "identity"), "which prompts are harmful or ask who the model is"),
    ):
        lacking = sum(column not in r for r in rows)
        if lacking:
            verdict = "skipped" if lacking == len(rows) else f"over the other {len(rows) - lacking} rows"
            for name in slices:
                out[name] = f"{lacking} of {len(rows)} rows have no {column!r} column ({why}): {verdict}"
    return out


# ----------------------------------------------------------------------------------------------
# Memorisation


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two token sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def memorisation_sequences(
    tokenizer, rows: list[dict], prefix_tokens: int, suffix_tokens: int, num_examples: int, seed: int = 0
) -> list[list[int]]:
    """Up to `num_examples` training conversations, rendered and cut to prefix + suffix tokens.

    Rows are visited in a seeded random order and shorter ones skipped, so only about `num_examples`
    rows are rendered however large the training set is.
    """
    need, picked = prefix_tokens + suffix_tokens, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    for i in order:
        if len(picked) >= num_examples:
            break
        ids = rendered_ids(tokenizer, rows[i]["messages"])
        if len(ids) >= need:
            picked.append(ids[:need])
    return picked


@torch.no_grad()
def memorisation(
    model,
    sequences: list[list[int]],
    prefix_tokens: int,
    suffix_tokens: int,
    pad_token_id: int,
    batch_size: int = 64,
    approximate_threshold: float = 0.1,
) -> dict:
    """Share of sequences whose greedy continuation of the prefix equals the true suffix.

    Exactly `suffix_tokens` tokens are generated: stop tokens are disabled (the true continuation may
    hold an `<end_of_turn>` mid-way). Prompts all have `prefix_tokens` tokens, so no padding is needed.
    """
    from transformers import GenerationConfig

    if not sequences:
        return {"n": 0, "exact": None, "approximate": None}
    # eos_token_id=None would be filled in from the model's generation_config.json (which stops on
    # <end_of_turn>); an empty list is "no stop token" and survives the merge.
    gen = GenerationConfig(do_sample=False, max_new_tokens=suffix_tokens, eos_token_id=[], pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    exact = approx = 0
    try:
        for start in range(0, len(sequences), batch_size):
            batch = torch.tensor([s[: prefix_tokens + suffix_tokens] for s in sequences[start : start + batch_size]])
            prompt = batch[:, :prefix_tokens].to(device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
            for generated, truth in zip(out[:, prefix_tokens:].tolist(), batch[:, prefix_tokens:].tolist()):
                exact += generated == truth
                approx += edit_distance(generated, truth) <= approximate_threshold * suffix_tokens
    finally:
        model.train(was_training)
    n = len(sequences)
    return {"n": n, "exact": round(exact / n, 4), "approximate": round(approx / n, 4)}


# ----------------------------------------------------------------------------------------------
# Reports


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _win_cell(cmp: Optional[dict]) -> str:
    if not cmp:
        return "–"
    return (  # three places: (wins + ties/2) / n is often a multiple of 0.005, which two would round away
        f"{cmp['win_rate']:.3f} [{cmp['ci_low']:.3f}, {cmp['ci_high']:.3f}] "
        f"({cmp['wins']}/{cmp['ties']}/{cmp['losses']})"
    )


def results_markdown(results: dict) -> str:
    """results.md: one row per model; accuracy overall and per task, the slices, win rates, memorisation."""
    tasks, judges, base = results["tasks"], results["judges"], results.get("baseline")
    head = ["model", "accuracy", *tasks, "refusal", "over-refusal", "identity slice"]
    head += [f"win rate vs {base} ({j})" for j in judges] if base else []
    head += ["memorised (exact)"]
    lines = [
        "# Evaluation",
        "",
        f"{results['num_prompts']} held-out prompts, {results['decoding']}. Accuracy: exact oracle answer. "
        "Refusal: share of harmful prompts refused; over-refusal: share of benign prompts refused; "
        "identity slice: share of identity answers naming the release and no other model.",
    ]
    if base:
        lines.append(
            f"Win rate against **{base}** on the same prompts = (wins + ties/2) / n, "
            f"95% bootstrap interval over prompts, (wins/ties/losses)."
        )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["models"].items():
        acc = m["accuracy"] or {}
        row = [
            name,
            _fmt(acc.get("overall")),
            *[_fmt(acc.get(t)) for t in tasks],
            _fmt(m["refusal_rate"]),
            _fmt(m["over_refusal_rate"]),
            _fmt(m["identity"]),
        ]
        if base:
            row += ["baseline" if name == base else _win_cell(m.get("win_rate", {}).get(j)) for j in judges]
        mem = m.get("memorisation") or {}
        row.append(f"{_fmt(mem.get('exact'))} (n={mem['n']})" if mem.get("n") else "–")
        lines.append("| " + " | ".join(row) + " |")
    if results.get("skipped"):
        lines += ["", "Left out (the rows do not carry what these need):", ""]
        lines += [f"- {name}: {why}" for name, why in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def _save_figure(fig, out: Path) -> Path:
    from .plots import save_figure

    fig.tight_layout()
    return save_figure(fig, out)


def plot_accuracy(results: dict, out: str | Path) -> Optional[Path]:
    """Grouped bars: accuracy overall and per task, one bar per model (None: no row has an answer)."""
    from .plots import pyplot

    plt = pyplot()

    if not any(m["accuracy"] for m in results["models"].values()):
        return None
    groups, names = ["overall", *results["tasks"]], list(results["models"])
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) + 1), 3.6))
    for i, name in enumerate(names):
        acc = results["models"][name]["accuracy"] or {}
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [acc.get(t) or 0.0 for t in groups], width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, Path(out))


def plot_win_rates(results: dict, out: str | Path) -> Optional[Path]:
    """Stacked horizontal bars of win / tie / loss shares per model and judge (None: nothing compared)."""
    from .plots import pyplot

    plt = pyplot()

    bars = [
        (f"{name} ({judge})", cmp)
        for name, m in results["models"].items()
        for judge, cmp in (m.get("win_rate") or {}).items()
    ]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(bars) + 1.8))
    left = np.zeros(len(bars))
    for part, colour in (("wins", "tab:green"), ("ties", "tab:gray"), ("losses", "tab:red")):
        share = np.array([cmp[part] / cmp["n"] for _, cmp in bars])
        ax.barh(range(len(bars)), share, left=left, color=colour, label=part)
        left += share
    ax.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(bars)), [label for label, _ in bars])
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of prompts against {results['baseline']}")
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _save_figure(fig, Path(out))
