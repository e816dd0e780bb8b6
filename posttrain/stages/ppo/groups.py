"""One update's rollouts for the RL stage: `sampling.n` samples per prompt from the engine, scored and
shaped, with DAPO's dynamic sampling (Yu et al. 2025, section 3.2) refilling groups that all score alike."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ...algos import grpo as G
from ...data import prompt_of
from ...dist.rank import all_ranks_mean
from ...engines import generate_own


class SampledGroups(NamedTuple):
    """Every rollout row (a prompt's n samples consecutive)."""

    prompt_index: list[int]
    samples: list
    reward: torch.Tensor
    score: torch.Tensor
    """The reward plus the end-of-turn and overlong penalties: what the policy is trained on."""
    parts: dict
    """The reward's parts by name."""
    counts: dict
    """Dynamic sampling: groups sampled, uninformative, and uninformative ones used to fill the batch."""


def sample_groups(
    cfg, engine, scorer, rows: list[dict], next_prompts: Callable[[], list[int]], seed: int
) -> SampledGroups:
    """`cfg.rollout_batch_size` groups. With dynamic sampling, groups whose samples all score alike are set
    aside and more prompts are sampled (at most `dynamic_sampling_rounds` rounds, decided together by all
    ranks); set-aside groups fill whatever is still missing. A non-finite reward raises FloatingPointError
    naming its rule (the scorer's)."""
    n = cfg.sampling.n
    kept, spare, counts = [], [], {"groups_sampled": 0, "groups_uninformative": 0}
    for round_ in range(cfg.dynamic_sampling_rounds if cfg.dynamic_sampling else 1):
        prompt_idx = next_prompts()
        sampling = cfg.sampling.model_copy(update={"seed": seed + 100_003 * round_})
        groups = generate_own(engine, [prompt_of(rows[i]) for i in prompt_idx], sampling)
        idx = [i for i, group in zip(prompt_idx, groups) for _ in group]
        samples = [s for group in groups for s in group]
        scored_rows = [rows[i] for i in idx]
        scores = scorer.score(
            [prompt_of(r) for r in scored_rows], [s.text for s in samples], scored_rows, training=True
        )
        shaped = shaped_score(cfg, scores.total, samples)
        # Judged on the shaped score, as the advantages are: a group whose rewards tie but whose length
        # penalties differ still has a gradient (DAPO judges accuracy, which its penalty leaves apart).
        informative = (
            G.informative_groups(shaped, n) if cfg.dynamic_sampling else torch.ones(len(prompt_idx), dtype=torch.bool)
        )
        counts["groups_sampled"] += len(prompt_idx)
        counts["groups_uninformative"] += int((~informative).sum())
        for g, keep in enumerate(informative.tolist()):
            rows_g = slice(g * n, (g + 1) * n)
            entry = (
                idx[rows_g],
                samples[rows_g],
                scores.raw[rows_g],  # reported as `reward`: the judges' weighted sum, before normalize whitens it
                shaped[rows_g],
                {k: v[rows_g] for k, v in scores.parts.items()},
            )
            (kept if keep else spare).append(entry)
        missing = cfg.rollout_batch_size - len(kept)
        if all_ranks_mean({"missing": float(missing > 0)})["missing"] == 0:
            break
    chosen = (kept + spare)[: cfg.rollout_batch_size]
    counts["groups_filled_uninformative"] = max(0, cfg.rollout_batch_size - len(kept))
    parts = {k: torch.cat([e[4][k] for e in chosen]) for k in chosen[0][4]}
    return SampledGroups(
        [i for e in chosen for i in e[0]],
        [s for e in chosen for s in e[1]],
        torch.cat([e[2] for e in chosen]),
        torch.cat([e[3] for e in chosen]),
        parts,
        counts,
    )


def shaped_score(cfg, total: torch.Tensor, samples: list) -> torch.Tensor:
    """The score the policy is trained on: the reward plus the end-of-turn and overlong penalties. A
    completion that did not end its turn counts as longer than sampling.max_new_tokens."""
    finished = torch.tensor([s.finished for s in samples])
    score = total + cfg.missing_eot_penalty * (~finished).float()
    if cfg.overlong_cache:
        lengths = torch.tensor([len(s.token_ids) + (0 if s.finished else 1) for s in samples])
        score = score + G.overlong_penalty(lengths, cfg.sampling.max_new_tokens, cfg.overlong_cache)
    return score
