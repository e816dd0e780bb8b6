"""One way to score conversations: a weighted sum of reward-model scores and rule rewards.

Used by prefs, PPO and evaluation. Rule rewards are Python functions loaded from a file path (configs
reference `reward/*.py`), called as `fn(prompts, completions, **row_columns) -> list[float]`.
The reward model scores the text the policy wrote, re-rendered with the reward model's own tokenizer
and chat template, so a reward model with a different tokenizer works.
End of turn is explicit: the scored conversation always closes the assistant turn (the template adds
`<end_of_turn>`); whether the policy actually ended its turn is the caller's `finished` flag, which
PPO turns into its missing-end-of-turn penalty rather than letting the reward model guess.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from pydantic import Field

from .config import RewardModelDir, Section
from .dist.rank import torch_dtype
from .implicit_rm import implicit_scores, read_reward_head
from .paths import check_reward_model
from .models import load_model, load_tokenizer


class RuleSpec(Section):
    """A rule reward: a function in a Python file."""

    path: str
    """Python file defining the function (e.g. reward/verifiers.py)."""
    function: str
    """Function name: fn(prompts, completions, **row_columns) -> list[float]."""
    weight: float = 1.0
    """Weight in the total reward."""
    kwargs: dict = {}
    """Extra keyword arguments passed on every call (e.g. release_name)."""


class ScoringConfig(Section):
    """How completions are scored."""

    reward_model: RewardModelDir = None
    """Reward model directory; default: the rm stage's output when the pipeline has one."""
    use_reward_model: bool = True
    """Include the reward model's score (when one is available)."""
    reward_model_weight: float = 1.0
    """Weight of the reward model score in the total."""
    rules: list[RuleSpec] = []
    """Rule rewards added to the total."""
    normalize: bool = False
    """Whiten the total with running mean/std across PPO's rollouts (reward normalisation; evaluation,
    pair margins and WARP's sweep always see the raw weighted sum)."""
    batch_size: int = Field(32, ge=1)
    """Conversations per reward-model forward pass."""


class RewardFunctionError(ValueError):
    """A rule reward that cannot be loaded, raises, or returns the wrong shape."""


class MissingColumnError(RewardFunctionError):
    """A rule reward needs metadata columns (task, answer, ...) that the rows it would judge lack."""


def required_columns(fn: Callable) -> list[str]:
    """The metadata columns a rule reward cannot run without: its parameters after (prompts, completions)
    that have no default (`**kwargs` and parameters with defaults are optional)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C function: nothing to inspect
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    return [
        p.name
        for p in params
        if p not in positional and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def common_columns(rows: list[dict]) -> set[str]:
    """The metadata keys every row has (conversation and pair columns excluded)."""
    keys = set(rows[0]) if rows else set()
    for r in rows[1:]:
        keys &= set(r)
    return keys - {"messages", "chosen", "rejected"}


def load_reward_function(path: str, function: str) -> Callable:
    """Import `function` from the Python file at `path` (not from sys.path: no name shadowing)."""
    file = Path(path)
    if not file.is_file():
        raise RewardFunctionError(f"rule reward file not found: {path}")
    module_name = f"posttrain_reward_{abs(hash(str(file.resolve())))}"
    folder = str(file.resolve().parent)
    if folder not in sys.path:  # its own helper modules beside it import (appended: nothing installed is shadowed)
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise RewardFunctionError(f"{path}: importing it failed: {type(err).__name__}: {err}") from err
    fn = getattr(module, function, None)
    if not callable(fn):
        raise RewardFunctionError(f"{path}: no function named {function!r}")
    return fn


def _is_number(v) -> bool:
    """A real number (Python, NumPy or a one-element tensor); True/False and strings are not."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _first_not_a_number(out) -> str:
    i, v = next((i, v) for i, v in enumerate(out) if not _is_number(v))
    return f"{type(v).__name__} {v!r:.60} at position {i}"


def _reward_values(out) -> Optional[torch.Tensor]:
    """A rule's return value as a float tensor, or None when it is not a sequence of real numbers (a dict would
    give its keys, strings and booleans would pass float())."""
    if isinstance(out, (torch.Tensor, np.ndarray)):
        if isinstance(out, np.ndarray) and out.dtype.kind not in "iuf":  # objects, strings, booleans
            return None
        t = torch.as_tensor(out)
        ok = t.dim() == 1 and not t.dtype.is_complex and t.dtype != torch.bool
        return t.detach().float().cpu() if ok else None
    if not isinstance(out, (list, tuple)) or not all(map(_is_number, out)):
        return None
    return torch.tensor([float(v) for v in out], dtype=torch.float32)


def call_rule(spec: RuleSpec, fn: Callable, prompts, completions, columns: dict) -> torch.Tensor:
    """Call a rule reward and check it returned one finite float per completion."""
    try:
        out = fn(prompts, completions, **columns, **spec.kwargs)
    except Exception as err:
        raise RewardFunctionError(
            f"rule reward {spec.path}:{spec.function} raised {type(err).__name__}: {err}"
        ) from err
    values = _reward_values(out)
    if values is None:
        got = type(out).__name__ if not isinstance(out, (list, tuple)) else _first_not_a_number(out)
        raise RewardFunctionError(
            f"rule reward {spec.path}:{spec.function} must return a list (or 1-d tensor or array) of real numbers, "
            f"one per completion; got {got}"
        )
    if values.shape != (len(completions),):
        raise RewardFunctionError(
            f"rule reward {spec.path}:{spec.function} returned {values.numel()} values "
            f"for {len(completions)} completions"
        )
    return values


def rule_keys(rules: list[RuleSpec]) -> list[str]:
    """The name each rule's scores go by (Scores.parts, logged as reward/<name>): its function name; where two
    rules share one, `file_stem.function`; where that is shared too (one function, other kwargs), the rule's
    position in the list appended: `function#i`."""
    out = []
    for i, spec in enumerate(rules):
        same = [r for r in rules if r.function == spec.function]
        stem = Path(spec.path).stem
        if len(same) == 1:
            out.append(spec.function)
        elif sum(Path(r.path).stem == stem for r in same) == 1:
            out.append(f"{stem}.{spec.function}")
        else:
            out.append(f"{spec.function}#{i}")
    return out


class RunningMoments:
    """Running mean and variance across batches (Chan et al. parallel update)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        b_mean, b_m2 = x.mean().item(), ((x - x.mean()) ** 2).sum().item()
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1))

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


@dataclass
class Scores:
    """Per-completion scores: the weighted total (whitened by `normalize` in training), each part unweighted,
    and the weighted total as the judges gave it (the reward a run reports: a whitened mean is 0 by design)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    raw: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.raw is None:
            self.raw = self.total


class Scorer:
    """Weighted sum of a reward model and rule rewards over (prompt, completion, row) triples. The reward
    model runs on `device` in the precision's dtype (inference only)."""

    def __init__(
        self,
        cfg: ScoringConfig,
        reward_model_dir: Optional[str] = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ):
        self.cfg, self.device = cfg, torch.device(device)
        self.rules = [(spec, load_reward_function(spec.path, spec.function)) for spec in cfg.rules]
        self.rule_keys = rule_keys(cfg.rules)
        self.rule_accepts = [accepted_columns(fn) for _, fn in self.rules]
        # What each rule reads, from its signature once (missing_columns runs for every scored batch).
        self.rule_columns = [
            (spec, [c for c in required_columns(fn) if c not in spec.kwargs]) for spec, fn in self.rules
        ]
        rm_dir = self.rm_dir = cfg.reward_model or reward_model_dir
        self.rm = self.rm_tokenizer = None
        self.implicit_head = None
        if cfg.use_reward_model and rm_dir:
            self.implicit_head = read_reward_head(rm_dir)  # a causal LM scored by its answer likelihood
            check_reward_model(rm_dir)  # not a causal LM given a random head (a path set by the stage, too)
            kind = "causal_lm" if self.implicit_head else "reward"
            self.rm = load_model(rm_dir, device=self.device, dtype=torch_dtype(precision), kind=kind).eval()
            self.rm_tokenizer = load_tokenizer(rm_dir)
            self.rm_tokenizer.padding_side = "right"
        if not self.rules and self.rm is None:
            raise ValueError("scoring: no reward model and no rule rewards configured; nothing to score with")
        self.moments = RunningMoments()

    def missing_columns(self, columns: set[str]) -> dict[str, list[str]]:
        """`path:function` of each rule -> the columns it needs that are not in `columns` (rules that can run
        are left out); a rule's own `kwargs` count as given."""
        out = {}
        for spec, needed in self.rule_columns:
            missing = [c for c in needed if c not in columns]
            if missing:
                out[f"{spec.path}:{spec.function}"] = missing
        return out

    def check_rows(
        self, rows: list[dict], what: str = "the rows", key: str = "scoring", rm_stage: bool = False
    ) -> None:
        """Raise MissingColumnError, before any scoring, when a rule needs a column some of `rows` lack.

        The message names each rule (`path:function`), the columns it needs and how many rows lack them, the
        columns the rows do have, and what to configure instead (`key` is the stage's scoring section;
        `rm_stage`: the stage also takes the reward model of an rm stage run before it)."""
        have = common_columns(rows)
        missing = self.missing_columns(have)
        if not missing:
            return
        needs = "; ".join(
            f"rule reward {rule} needs the column{'s' if len(cols) > 1 else ''} {', '.join(map(repr, cols))}, which "
            f"{max(sum(c not in r for r in rows) for c in cols)} of {len(rows)} rows of {what} lack"
            for rule, cols in missing.items()
        )
        raise MissingColumnError(
            f"{needs} (columns every row has: {', '.join(sorted(have)) or 'none'}). Such columns come with the data "
            f"(synth recipes write task and answer for the built-in tasks). To judge rows without them, score with "
            f"a reward model ({key}.reward_model{', or an rm stage earlier in the pipeline' if rm_stage else ''}) "
            f"and/or rule rewards that "
            f"read no metadata ({key}.rules, e.g. {{path: reward/style.py, function: well_formed}}); "
            f"{key}.rules: [] leaves the reward model alone"
        )

    @torch.no_grad()
    def reward_model_scores(self, prompts: list[list[dict]], completions: list[str]) -> torch.Tensor:
        """The reward model's scalar for each conversation, rendered with the RM's own template.

        Sequence-classification head: its output at the last token (the template's trailing end-of-turn
        included). Implicit head: β · mean log-probability of the completion's tokens, up to and including
        the end-of-turn token the template closes the turn with."""
        if self.implicit_head is not None:
            conversations = [p + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
            return implicit_scores(
                self.rm, self.rm_tokenizer, conversations, self.implicit_head["beta"], self.cfg.batch_size
            )
        texts = [
            self.rm_tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
            for p, c in zip(prompts, completions)
        ]
        out = []
        for i in range(0, len(texts), self.cfg.batch_size):
            enc = self.rm_tokenizer(
                texts[i : i + self.cfg.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            out.append(self.rm(**enc).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(
        self,
        prompts: list[list[dict]],
        completions: list[str],
        rows: Optional[list[dict]] = None,
        training: bool = False,
    ) -> Scores:
        """Score completions; `rows` supply metadata columns (task, answer, ...) to rule rewards.
        `training`: a trainer's own rollouts, the only calls that update and apply `normalize`'s running
        moments; every other caller gets the raw weighted sum and leaves the moments alone."""
        n = len(completions)
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(n)
        if self.rm is not None:
            parts["reward_model"] = self.reward_model_scores(prompts, completions)
            total += self.cfg.reward_model_weight * parts["reward_model"]
        rows = rows or [{} for _ in range(n)]
        if self.rules:
            self.check_rows(rows)
        columns = _columns(rows)
        for (spec, fn), key, accepts in zip(self.rules, self.rule_keys, self.rule_accepts):
            given = {k: v for k, v in columns.items() if (accepts is None or k in accepts) and k not in spec.kwargs}
            parts[key] = call_rule(spec, fn, prompts, completions, given)
            total += spec.weight * parts[key]
        sources = [f"the reward model {self.rm_dir}"] if self.rm is not None else []
        sources += [f"rule reward {spec.path}:{spec.function}" for spec, _ in self.rules]
        for source, values in zip(sources, parts.values()):
            bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
            if bad:
                raise FloatingPointError(
                    f"{source} gave a non-finite reward ({values[bad[0]].item()}) for "
                    f"{len(bad)} of {n} completions, first the completion {completions[bad[0]]!r}"
                )
        raw = total
        if self.cfg.normalize and training:
            self.moments.update(total)
            total = (total - self.moments.mean) / (self.moments.std + 1e-8)
        return Scores(total=total, parts=parts, raw=raw)


def _columns(rows: list[dict]) -> dict[str, list]:
    """Row dicts -> column lists, for the metadata keys any row has; None where a row lacks the key (a null
    value is read as a missing one). Columns a rule cannot run without are in every row (`check_rows`)."""
    keys = sorted(set().union(*rows) - {"messages", "chosen", "rejected"}) if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


def accepted_columns(fn: Callable) -> Optional[set[str]]:
    """The keyword parameters a rule reward takes after (prompts, completions), or None when it takes
    `**kwargs` (every column): a column only some rows have is passed only to rules that name it or take any."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
