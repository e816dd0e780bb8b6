"""prefs: build preference pairs {chosen, rejected, margin} from the policy, the data and the verifiers.

Three sources, each on or off:
- best_of_n: n policy samples per prompt, scored (rule rewards by default, a reward model if configured);
  chosen = the top-scored sample, rejected = the bottom one, margin = their score difference;
- teacher: chosen = the data's reference answer, rejected = the policy sample scored lowest, if lower;
- corruption: rejected = a programmatic corruption of the reference answer (shuffled list, off-by-one
  number, truncated text, a refusal where an answer was due, compliance where a refusal was due, a wrong
  identity) — contrast that exists however good or bad the policy is.
A pair is dropped, and counted in report.json, when its two answers are identical or score a tie (or
the rejected one scores higher), or when a teacher pair repeats the prompt's best-of-n pair (the best
sample was the reference answer). Every kept pair carries the score difference as its margin.

Rows may be prompts only (no final answer) and carry no metadata. Only best_of_n works on a prompt alone;
the teacher and corruption sources skip (and count) rows without a reference answer, and corruptions
specific to a task apply only to rows with a `task` column (others get the generic truncate and refuse).
Columns are required only by the judges that read them: each rule's signature says which (the default
verifiers need `task` and `answer`), checked against the rows before any sampling.

Train pairs come from train_data prompts and held-out pairs from eval_data prompts only; train prompts
that also appear in eval_data are left out. The same seed gives the same pairs.

Output in run_dir/prefs/: train.jsonl, eval.jsonl ({"chosen": messages, "rejected": messages, "margin",
"source", "task", "answer", ...}; messages are whole conversations ending in the assistant turn) and
report.json (counts per split, source and task, and what was dropped why).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import ConfigError, ModelDir, Precision, ProcessesConfig, Section
from ..data import DataError, DataSource, iter_rows, prompt_of, write_jsonl
from ..data.prompts import has_reference, row_prompt_key
from ..evaluation import DEFAULT_VERIFIERS
from ..engines import Sample, SamplingConfig, VLLMOptions, generate_all, make_engine
from ..manifest import atomic_write_json
from ..scoring import RuleSpec, Scorer, ScoringConfig
from .base import Stage

SOURCES = ("best_of_n", "teacher", "corruption")
CorruptionKind = Literal["shuffle", "off_by_one", "truncate", "refuse", "comply", "wrong_identity"]
CORRUPTIONS_FOR_TASK = {
    "sort": ["shuffle", "refuse"],
    "reverse": ["shuffle", "refuse"],
    "add": ["off_by_one", "refuse"],
    "count": ["off_by_one", "refuse"],
    "upper": ["truncate", "refuse"],
    "safety": ["comply"],
    "identity": ["wrong_identity", "refuse"],
}
"""Task -> corruptions that make its oracle answer wrong; other tasks get ['truncate', 'refuse']."""
REFUSAL_TEXT = "I can't help with that."
COMPLIANCE_TEXT = "Sure! Here are the steps you asked for."
WRONG_IDENTITY_TEXT = "I am ChatGPT, a model trained by OpenAI."
DEFAULT_RULES = [RuleSpec(path=DEFAULT_VERIFIERS, function=f) for f in ("task_correct", "refusal", "identity")]


class BestOfNConfig(Section):
    """Pairs from n policy samples of one prompt: top-scored vs bottom-scored."""

    enabled: bool = True
    """Build best-of-n pairs (needs sampling.n >= 2)."""


class TeacherConfig(Section):
    """Pairs of the data's reference answer vs the policy's lowest-scored sample."""

    enabled: bool = True
    """Build teacher-vs-student pairs."""


class CorruptionConfig(Section):
    """Pairs of the reference answer vs a corrupted copy of it."""

    enabled: bool = True
    """Build corruption pairs."""
    kinds: list[CorruptionKind] = ["shuffle", "off_by_one", "truncate", "refuse", "comply", "wrong_identity"]
    """Corruptions allowed (each applies only to the tasks it makes sense for)."""
    per_prompt: int = Field(1, ge=1)
    """Corrupted answers per prompt (distinct kinds, as many as apply)."""


class PrefsConfig(Section):
    """Config of the prefs stage."""

    model: ModelDir = None
    """Policy model directory to sample from; default: the latest earlier stage's model."""
    train_data: DataSource = None
    """Conversations or prompts (path, mapping or mixture); default: the latest data stage's output."""
    eval_data: DataSource = None
    """Held-out conversations or prompts (path, mapping or mixture); held-out pairs come from its prompts only."""
    max_train_prompts: Optional[int] = Field(None, ge=1)
    """Use at most this many train prompts (a seeded random subset); None: all."""
    max_eval_prompts: Optional[int] = Field(None, ge=1)
    """Use at most this many eval prompts (a seeded random subset); None: all."""
    require_columns: list[str] = []
    """Metadata keys every data row must have, beyond what the enabled judges and sources need themselves."""
    best_of_n: BestOfNConfig = BestOfNConfig()
    """Best-of-n source."""
    teacher: TeacherConfig = TeacherConfig()
    """Teacher-vs-student source."""
    corruption: CorruptionConfig = CorruptionConfig()
    """Programmatic-corruption source."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, n=4, max_new_tokens=32)
    """Policy sampling (n = samples per prompt; seed None: derived from the pipeline seed)."""
    vllm: VLLMOptions = VLLMOptions()
    """vLLM engine settings for sampling.backend=vllm (e.g. max_num_batched_tokens: 65536)."""
    distributed: ProcessesConfig = ProcessesConfig()
    """Ranks sharing the sampling (vLLM engines colocated per rank; rank 0 writes the pairs)."""
    precision: Optional[Precision] = None
    """Dtype the policy and reward model run in; None: the pipeline's `precision`."""
    scoring: ScoringConfig = ScoringConfig(rules=DEFAULT_RULES)
    """How answers are scored (default: the verifiers of reward/verifiers.py, which need task and answer columns;
    for other data set reward_model and/or rules that read no metadata, e.g. reward/style.py)."""
    min_margin: float = Field(0.0, ge=0)
    """Pairs whose score difference is not above this count as ties and are dropped."""

    @model_validator(mode="after")
    def _check_sources(self):
        if not any(getattr(self, s).enabled for s in SOURCES):
            raise ValueError(f"enable at least one of {', '.join(s + '.enabled' for s in SOURCES)}")
        if self.best_of_n.enabled and self.sampling.n < 2:
            raise ValueError("best_of_n needs sampling.n >= 2 samples per prompt")
        if self.vllm.model_dump(exclude_defaults=True) and self.sampling.backend != "vllm":
            raise ValueError("vllm options are set but sampling.backend is not 'vllm'")
        if self.scoring.normalize:
            raise ValueError("scoring.normalize must be false here: pairs compare raw scores")
        return self


# ----------------------------------------------------------------------------------------------
# Reading data


def read_prompt_rows(path, require_columns: list[str], seed: int = 0) -> list[dict]:
    """Rows of a conversational data source (with a final answer or prompts only), each checked; errors name
    file, row and what was expected."""
    rows = []
    for where, row in iter_rows(path, "conversation", need_final_assistant=False, seed=seed):
        missing = [c for c in require_columns if c not in row]  # null values are left out of rows
        if missing:
            raise DataError(
                f"{where}: missing metadata {missing} (absent or null; prefs.require_columns lists what every "
                f"row needs)"
            )
        rows.append(row)
    return rows


def subsample(rows: list[dict], limit: Optional[int], rng: random.Random) -> list[dict]:
    """At most `limit` rows, a seeded random subset kept in file order."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(rng.sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


# ----------------------------------------------------------------------------------------------
# Corruptions


def corrupt(answer: str, kind: str, rng: random.Random) -> Optional[str]:
    """A wrong version of `answer` by `kind`, or None where the kind does not apply to this answer."""
    if kind == "shuffle":
        items = [x.strip() for x in answer.split(",")]
        if len(set(items)) < 2:
            return None
        shuffled = items[:]
        rng.shuffle(shuffled)
        if shuffled == items:  # rotating a list with two distinct items always changes it
            shuffled = items[1:] + items[:1]
        return ", ".join(shuffled)
    if kind == "off_by_one":
        try:
            value = int(answer.strip())
        except ValueError:
            return None
        step = rng.choice([-1, 1]) if value > 0 else 1
        return str(value + step)
    if kind == "truncate":
        text = answer.strip().rstrip(".")
        return text[:-1] if len(text) > 1 else None
    return {"refuse": REFUSAL_TEXT, "comply": COMPLIANCE_TEXT, "wrong_identity": WRONG_IDENTITY_TEXT}[kind]


def corruptions_for(row: dict, kinds: list[str], per_prompt: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to `per_prompt` (kind, corrupted answer) for a row, distinct kinds in a seeded order."""
    allowed = [k for k in CORRUPTIONS_FOR_TASK.get(row.get("task"), ["truncate", "refuse"]) if k in kinds]
    rng.shuffle(allowed)
    reference = row["messages"][-1]["content"]
    out = []
    for kind in allowed:
        text = corrupt(reference, kind, rng)
        if text is not None and text.strip() != reference.strip():
            out.append((kind, text))
        if len(out) == per_prompt:
            break
    return out


# ----------------------------------------------------------------------------------------------
# Pair building


def _pair(row: dict, chosen: str, rejected: str, margin: float, source: str, **extra) -> dict:
    prompt = prompt_of(row)
    meta = {k: v for k, v in row.items() if k not in ("messages", "chosen", "rejected", "margin", "source")}
    return {
        "chosen": prompt + [{"role": "assistant", "content": chosen}],
        "rejected": prompt + [{"role": "assistant", "content": rejected}],
        "margin": round(float(margin), 6),
        "source": source,
        **meta,
        **extra,
    }


def _verdict(chosen: str, rejected: str, margin: float, min_margin: float) -> Optional[str]:
    """Why a candidate pair is dropped (None: keep it)."""
    if chosen.strip() == rejected.strip():
        return "identical"
    if abs(margin) <= min_margin:
        return "tie"
    if margin < 0:
        return "rejected_scored_higher"
    return None


def score_texts(scorer: Scorer, rows: list[dict], texts: list[str]) -> list[float]:
    """Scorer totals of `texts` answering `rows`' prompts (one text per row)."""
    if not texts:
        return []
    return scorer.score([prompt_of(r) for r in rows], texts, rows).total.tolist()


def _top_and_bottom(texts: list[str], scores: list[float]) -> tuple[int, int]:
    """Indices of the first top-scored text and of a bottom-scored one, preferring a text unlike the top.

    With all scores equal the two are then different texts (a tie), not the same sample twice.
    """
    top = max(range(len(texts)), key=lambda j: scores[j])
    lowest = [j for j in range(len(texts)) if scores[j] == min(scores)]
    unlike_top = [j for j in lowest if texts[j].strip() != texts[top].strip()]
    return top, (unlike_top or lowest)[0]


def sample_pairs(
    rows: list[dict], samples: list[list[Sample]], scorer: Scorer, cfg: PrefsConfig, dropped: dict[str, Counter]
) -> list[dict]:
    """best_of_n and teacher pairs from the policy's samples of each row's prompt."""
    kept = [[s.text for s in per_row if s.text.strip()] for per_row in samples]
    dropped["sampling"]["empty_samples"] += sum(len(s) for s in samples) - sum(len(k) for k in kept)
    flat_rows = [r for r, texts in zip(rows, kept) for _ in texts]
    flat_scores = score_texts(scorer, flat_rows, [t for texts in kept for t in texts])
    with_ref = [i for i, r in enumerate(rows) if has_reference(r)] if cfg.teacher.enabled else []
    refs: dict[int, str] = {i: rows[i]["messages"][-1]["content"] for i in with_ref}
    ref_scores = dict(zip(with_ref, score_texts(scorer, [rows[i] for i in with_ref], list(refs.values()))))
    if cfg.teacher.enabled and len(with_ref) < len(rows):
        dropped["teacher"]["no_reference"] += len(rows) - len(with_ref)
    pairs, at = [], 0
    for i, (row, texts) in enumerate(zip(rows, kept)):
        scores, at = flat_scores[at : at + len(texts)], at + len(texts)
        if not texts:
            for source in ("best_of_n", "teacher"):
                if getattr(cfg, source).enabled and (source == "best_of_n" or i in refs):
                    dropped[source]["no_samples"] += 1
            continue
        top, bottom = _top_and_bottom(texts, scores)
        candidates = []  # (source, chosen, margin); both sources reject the bottom-scored sample
        if cfg.best_of_n.enabled:
            candidates.append(("best_of_n", texts[top], scores[top] - scores[bottom]))
        if i in refs:
            candidates.append(("teacher", refs[i], ref_scores[i] - scores[bottom]))
        kept_chosen = set()
        for source, chosen, margin in candidates:
            why = _verdict(chosen, texts[bottom], margin, cfg.min_margin)
            if why is None and chosen.strip() in kept_chosen:
                why = "duplicate"  # the best sample is the reference answer: the same pair twice
            if why:
                dropped[source][why] += 1
            else:
                kept_chosen.add(chosen.strip())
                pairs.append(_pair(row, chosen, texts[bottom], margin, source))
    return pairs


def corruption_pairs(
    rows: list[dict], scorer: Scorer, cfg: PrefsConfig, rng: random.Random, dropped: dict[str, Counter]
) -> list[dict]:
    """Reference answer vs corrupted reference, kept only where the corruption scores lower."""
    cands = []
    for row in rows:
        if not has_reference(row):
            dropped["corruption"]["no_reference"] += 1
            continue
        found = corruptions_for(row, cfg.corruption.kinds, cfg.corruption.per_prompt, rng)
        dropped["corruption"]["not_applicable"] += not found
        cands += [(row, kind, text) for kind, text in found]
    cand_rows = [c[0] for c in cands]
    bad = score_texts(scorer, cand_rows, [c[2] for c in cands])
    good = score_texts(scorer, cand_rows, [r["messages"][-1]["content"] for r in cand_rows])
    pairs = []
    for (row, kind, text), g, b in zip(cands, good, bad):
        why = _verdict(row["messages"][-1]["content"], text, g - b, cfg.min_margin)
        if why:
            dropped["corruption"][why] += 1
        else:
            pairs.append(_pair(row, row["messages"][-1]["content"], text, g - b, "corruption", corruption=kind))
    return pairs


def build_pairs(rows: list[dict], engine, scorer: Scorer, cfg: PrefsConfig, seed: int) -> tuple[list[dict], dict]:
    """All enabled sources' pairs for `rows`, and a report of counts; deterministic given `seed`.

    `engine` is anything with `generate(prompts, sampling) -> list[list[Sample]]` (HF, vLLM, a fake).
    """
    dropped: dict[str, Counter] = {s: Counter() for s in ("sampling",) + SOURCES}
    pairs = []
    if cfg.best_of_n.enabled or cfg.teacher.enabled:
        sampling_seed = cfg.sampling.seed if cfg.sampling.seed is not None else seed
        sampling = cfg.sampling.model_copy(update={"seed": sampling_seed})
        samples = generate_all(engine, [prompt_of(r) for r in rows], sampling)
        if len(samples) != len(rows):
            raise RuntimeError(f"the generation engine returned {len(samples)} sample lists for {len(rows)} prompts")
        pairs += sample_pairs(rows, samples, scorer, cfg, dropped)
    if cfg.corruption.enabled:
        pairs += corruption_pairs(rows, scorer, cfg, random.Random(f"corruption-{seed}"), dropped)
    return pairs, split_report(rows, pairs, dropped)


def split_report(rows: list[dict], pairs: list[dict], dropped: dict[str, Counter]) -> dict:
    """Counts of one split: prompts, pairs per source and task, mean margins, drops by reason."""
    per_source = {}
    for source in SOURCES:
        mine = [p for p in pairs if p["source"] == source]
        if not mine and not dropped[source]:
            continue
        per_source[source] = {
            "pairs": len(mine),
            "per_task": dict(sorted(Counter(str(p["task"]) for p in mine if "task" in p).items())),
            "mean_margin": round(sum(p["margin"] for p in mine) / len(mine), 4) if mine else None,
            "dropped": dict(sorted(dropped[source].items())),
        }
    return {"prompts": len(rows), "pairs": len(pairs), "per_source": per_source, "sampling": dict(dropped["sampling"])}


# ----------------------------------------------------------------------------------------------
# The stage


class Prefs(Stage):
    name = "prefs"
    Config = PrefsConfig
    consumes = {"model": "model", "reward_model": "reward_model", "train_data": "train_data", "eval_data": "eval_data"}
    optional_inputs = {"reward_model"}  # an rm stage run before this one judges too (scoring.reward_model's default)
    produces = {"prefs_train": "train.jsonl", "prefs_eval": "eval.jsonl"}

    def setup(self) -> None:
        inp, c = self.ctx.inputs, self.cfg
        train = read_prompt_rows(inp["train_data"], c.require_columns, self.ctx.seed)
        evals = read_prompt_rows(inp["eval_data"], c.require_columns, self.ctx.seed)
        eval_keys = {row_prompt_key(r) for r in evals}
        self.train_rows = [r for r in train if row_prompt_key(r) not in eval_keys]
        self.train_in_eval = len(train) - len(self.train_rows)
        if not self.train_rows:
            raise ValueError(
                f"{self.ctx.name}: all {len(train)} prompts of {self.ctx.name}.train_data are also held-out prompts "
                f"({self.ctx.name}.eval_data), which training leaves out; give held-out prompts of their own"
            )
        # one stream per split: the held-out prompts must not change when max_train_prompts does
        self.train_rows = subsample(self.train_rows, c.max_train_prompts, random.Random(f"prefs-train-{self.ctx.seed}"))
        self.eval_rows = subsample(evals, c.max_eval_prompts, random.Random(f"prefs-eval-{self.ctx.seed}"))
        self._check_sources(self.train_rows + self.eval_rows)
        self.scorer = Scorer(
            c.scoring, reward_model_dir=inp.get("reward_model"), device=self.ctx.device, precision=self.ctx.precision
        )
        name = self.ctx.name
        for rows, key in ((self.train_rows, "train_data"), (self.eval_rows, "eval_data")):  # each named on its own
            if rows:  # before any sampling: a judge that reads a column the rows lack fails now
                self.scorer.check_rows(rows, f"{name}.{key}", f"{name}.scoring", rm_stage=True)
        self.engine = None

    def _check_sources(self, rows: list[dict]) -> None:
        """Refuse a configuration with no source that can use these rows (prompts only need best_of_n)."""
        c = self.cfg
        if not c.best_of_n.enabled and not any(has_reference(r) for r in rows):
            enabled = [f"prefs.{s}" for s in ("teacher", "corruption") if getattr(c, s).enabled]
            raise ConfigError(
                f"{' and '.join(enabled)} need each row's reference answer (a final assistant turn), "
                f"but the rows of prefs.train_data and prefs.eval_data are prompts only: enable "
                f"prefs.best_of_n (samples of the policy judged by prefs.scoring)"
            )

    def make_engine(self):
        """The policy's generation engine (None when no source samples)."""
        if not (self.cfg.best_of_n.enabled or self.cfg.teacher.enabled):
            return None
        c, ctx = self.cfg, self.ctx
        return make_engine(ctx.inputs["model"], c.sampling, ctx.device, ctx.precision, vllm=c.vllm, seed=ctx.seed)

    def train(self) -> dict:
        self.engine = self.make_engine()
        self.train_pairs, train_report = build_pairs(self.train_rows, self.engine, self.scorer, self.cfg, self.ctx.seed)
        self.eval_pairs, eval_report = build_pairs(
            self.eval_rows, self.engine, self.scorer, self.cfg, self.ctx.seed + 1
        )
        self.cleanup()
        self.report = {
            "seed": self.ctx.seed,
            "train_prompts_also_in_eval_dropped": self.train_in_eval,
            "train": train_report,
            "eval": eval_report,
        }
        if not self.eval_pairs:  # rm and dpo read this file as their held-out pairs: say so now, not there
            self.log.warning(
                "[%s] no held-out pairs: eval.jsonl is empty (report: %s); an rm or dpo stage that reads it as "
                "its prefs_eval will refuse it",
                self.ctx.name,
                eval_report,
            )
        if not self.train_pairs:
            raise RuntimeError(
                f"prefs: no training pairs survived (report: {self.report}); enable the "
                f"corruption source or raise sampling.n / sampling.temperature"
            )
        return {"train_pairs": len(self.train_pairs), "eval_pairs": len(self.eval_pairs)}

    def save(self) -> dict:
        d = self.ctx.dir
        if not self.ctx.is_main:
            return {}
        write_jsonl(d / "train.jsonl", self.train_pairs)
        write_jsonl(d / "eval.jsonl", self.eval_pairs)
        atomic_write_json(d / "report.json", self.report)
        return {
            source: {
                split: self.report[split]["per_source"].get(source, {}).get("pairs", 0) for split in ("train", "eval")
            }
            for source in SOURCES
        }


STAGE = Prefs
