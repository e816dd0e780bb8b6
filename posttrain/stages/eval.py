"""eval: compare models side by side on held-out prompts, and report what each learnt or memorised.

Models come from config (`models`: name -> model directory, or an artifact reference like `sft.model`
read from that stage's manifest in this run); by default every complete sft/distill/ppo/merge stage of
the run. Each model answers every held-out prompt once (greedy by default; a sampled eval uses one seed
for all models) through the generation engine (hf or vllm). Then, per model:
- win rate against the baseline, per judge: the reward model's score (when there is one) and the rules
  (`rules`: the weighted total of `scoring.rules`; with none configured, `verifiers`: task_correct, refusal
  and identity of reward/verifiers.py, judging only the rows that carry the task and answer columns they
  read). Identical answers are ties;
- accuracy overall and per task (rows with an `answer`), refusal and over-refusal rates and identity accuracy
  (rows with a `task`); a slice no row can feed is skipped, and results.json says why;
- memorisation of training examples (when train_data is available): prompts are raw token ids, so this
  runs on the Hugging Face model directly whatever the backend (a few dozen greedy continuations).

Output in run_dir/eval/: results.json, results.md, completions.jsonl, accuracy.png, win_rate.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from pydantic import Field, field_validator

from ..config import ConfigError, FilePath, ModelDir, Precision, ProcessesConfig, Section
from ..data import DataError, DataSource, iter_rows, prompt_of, read_rows, write_jsonl
from ..evaluation import (
    DEFAULT_VERIFIERS,
    VERIFIER_FUNCTIONS,
    answer_metrics,
    compare,
    load_verifiers,
    memorisation,
    memorisation_sequences,
    plot_accuracy,
    plot_win_rates,
    results_markdown,
    slice_skips,
)
from ..dist.rank import torch_dtype
from ..graph import check_function_file
from ..engines import SamplingConfig, VLLMOptions, generate_all, make_engine
from ..models import check_model_dir, load_model
from ..manifest import atomic_write_json, atomic_write_text
from ..model_card import completed_models, recipe_identity, relative_to_run
from ..scoring import RuleSpec, Scorer, ScoringConfig
from .base import Stage

VERIFIER_RULES = ("task_correct", "refusal", "identity")
"""The rules judging answers when `scoring.rules` is empty (functions of the `verifiers` file)."""


class MemorisationConfig(Section):
    """Memorisation probe of training examples (as in the Gemma reports)."""

    num_examples: int = Field(64, ge=0)
    """Training conversations probed (0 = skip the probe)."""
    prefix_tokens: int = Field(16, ge=1)
    """Prompt: the first N tokens of the rendered conversation (the Gemma reports use 50)."""
    suffix_tokens: int = Field(8, ge=1)
    """Tokens generated greedily and compared with the true continuation (the Gemma reports use 50)."""
    approximate_threshold: float = Field(0.1, ge=0, le=1)
    """Approximate memorisation: token edit distance at most this share of suffix_tokens."""


class EvalConfig(Section):
    """Config of the eval stage."""

    models: dict[str, ModelDir] = {}
    """Name -> model directory or artifact reference (e.g. {sft: sft.model, ppo: ppo.model}); default:
    every complete sft, distill, dpo, ppo, warp and merge stage of this run."""
    baseline: Optional[str] = None
    """Name (a key of models) the others are compared against; default: sft when present, else the first."""
    eval_data: DataSource = None
    """Held-out prompts or conversations (path, mapping or mixture); task and answer columns, where rows have
    them, feed the accuracy, safety and identity slices; default: the data stage's held-out split."""
    train_data: DataSource = None
    """Training conversations probed for memorisation (path, mapping or mixture); default: the latest training
    split of the run."""
    num_prompts: Optional[int] = Field(200, ge=1)
    """Held-out prompts to answer (the first N rows); None = all."""
    sampling: SamplingConfig = SamplingConfig()
    """Answers: backend hf|vllm, greedy by default; a sampled eval uses `seed` (default: the pipeline seed)."""
    vllm: VLLMOptions = VLLMOptions()
    """vLLM engine settings for backend vllm (e.g. kv_cache_gib, max_model_len)."""
    distributed: ProcessesConfig = ProcessesConfig()
    """Ranks sharing the answering (vLLM engines colocated per rank; rank 0 judges and writes)."""
    precision: Optional[Precision] = None
    """Dtype the evaluated models and the reward model run in; None: the pipeline's `precision`."""
    scoring: ScoringConfig = ScoringConfig()
    """Judges: the reward model (scoring.reward_model, else the rm stage's) and rules; no rules = the verifiers
    (on the rows that have task and answer columns)."""
    verifiers: FilePath = DEFAULT_VERIFIERS
    """Python file with the task_correct, refusal and identity verifiers (the slices and the default rules)."""
    release_name: Optional[str] = None
    """Name identity answers must give; default: the synth recipe's identity name."""
    bootstrap_samples: int = Field(1000, ge=10)
    """Bootstrap resamples of the prompts for the win-rate confidence intervals."""
    memorisation: MemorisationConfig = MemorisationConfig()
    """Memorisation probe settings."""

    @field_validator("sampling")
    @classmethod
    def _one_answer(cls, sampling: SamplingConfig) -> SamplingConfig:
        if sampling.n != 1:
            raise ValueError("eval compares one answer per prompt: set sampling.n to 1")
        return sampling


def read_eval_rows(path, limit: Optional[int] = None, seed: int = 0) -> list[dict]:
    """Held-out rows (the first `limit`): prompts, or conversations whose final answer is left unused."""
    rows = []
    for _, row in iter_rows(path, "conversation", need_final_assistant=False, seed=seed):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{path}: no eval rows")
    return rows


class Eval(Stage):
    name = "eval"
    Config = EvalConfig
    consumes = {"eval_data": "eval_data", "train_data": "train_data", "reward_model": "reward_model"}
    optional_inputs = {"train_data", "reward_model"}
    produces = {"eval_results": "results.json"}

    # ------------------------------------------------------------------ setup
    @classmethod
    def check_plan(cls, name: str, cfg, inputs: dict, artifacts: dict, kinds: dict) -> None:
        models = list(cfg.models) if cfg.models else list(completed_models(artifacts, kinds))
        if cfg.baseline is not None and cfg.baseline not in models:
            raise ConfigError(f"{name}.baseline={cfg.baseline!r} is not one of the evaluated models {models}")
        for function in VERIFIER_FUNCTIONS:  # the safety and identity slices call them
            check_function_file(f"{name}.verifiers", cfg.verifiers, function)

    def setup(self) -> None:
        c, inp = self.cfg, self.ctx.inputs
        self.models = self._resolve_models()
        if c.sampling.backend == "vllm":  # every model now, not when its turn comes after others were answered
            from ..engines.vllm import check_vllm_supported

            for model_name, path in self.models.items():
                try:
                    check_vllm_supported(path)
                except RuntimeError as err:
                    raise ConfigError(
                        f"{self.ctx.name}.models.{model_name}: {err} ({self.ctx.name}.sampling.backend is vllm)"
                    ) from None
        self.baseline = self._baseline()
        self.rows = read_eval_rows(inp["eval_data"], c.num_prompts, self.ctx.seed)
        probe = inp.get("train_data") and c.memorisation.num_examples
        self.train_rows = read_rows(inp["train_data"], seed=self.ctx.seed, need_final_assistant=False) if probe else []
        self.release_name = c.release_name or recipe_identity(self.ctx.pipeline, before=self.ctx.name).get("name")
        self.verifiers = load_verifiers(c.verifiers)
        self.skipped = slice_skips(self.rows)
        if c.memorisation.num_examples and not inp.get("train_data"):
            self.skipped["memorisation"] = (
                f"no training data to probe: {self.ctx.name}.train_data is not set and no earlier stage wrote a "
                f"training split (a stage that read its data from a path does not count): set it"
            )
        self._judges(inp.get("reward_model"))
        self.seed = c.sampling.seed if c.sampling.seed is not None else self.ctx.seed

    def _resolve_models(self) -> dict[str, str]:
        run_dir = self.ctx.dir.parent
        if self.cfg.models:
            models = dict(self.cfg.models)  # references (sft.model) were resolved to paths by the runner
        else:
            models = completed_models(self.ctx.artifacts, self.ctx.kinds)
            if not models:
                raise ConfigError(
                    f"eval.models: nothing to evaluate: no sft, distill, dpo, ppo, warp or merge "
                    f"stage is complete in {run_dir}; name model directories or references in "
                    f"eval.models"
                )
        for name, path in models.items():
            try:
                check_model_dir(path)
            except (OSError, ValueError) as err:
                raise ConfigError(f"eval.models.{name}: {err}") from None
        return models

    def _baseline(self) -> Optional[str]:
        names = list(self.models)
        if self.cfg.baseline is not None:  # one of them: check_plan said so before the stage started
            return self.cfg.baseline
        if len(names) < 2:
            return None
        return "sft" if "sft" in self.models else names[0]

    def _judges(self, rm_dir: Optional[str]) -> None:
        """The reward model (when there is one) and the rules: the configured ones, checked against every row
        now, or else the verifiers (identity told the release name) on the rows that have their columns."""
        s, ctx = self.cfg.scoring, self.ctx
        self.rm_scorer, self.judge_sources = None, {}
        if s.use_reward_model and (s.reward_model or rm_dir):
            self.rm_scorer = Scorer(
                s.model_copy(update={"rules": []}), reward_model_dir=rm_dir, device=ctx.device, precision=ctx.precision
            )
            self.judge_sources["reward_model"] = relative_to_run(s.reward_model or rm_dir, ctx.dir.parent)
        if s.rules:
            self.judge_sources["rules"] = [f"{Path(r.path).name}:{r.function} (weight {r.weight:g})" for r in s.rules]
            self.rule_judge, self.rule_rows = "rules", list(range(len(self.rows)))
            self.rule_scorer = Scorer(s.model_copy(update={"use_reward_model": False}))
            self.rule_scorer.check_rows(self.rows, f"{ctx.name}.eval_data", f"{ctx.name}.scoring", rm_stage=True)
            return
        name = {"release_name": self.release_name} if self.release_name else {}
        rules = [
            RuleSpec(path=self.cfg.verifiers, function=f, kwargs=name if f == "identity" else {})
            for f in VERIFIER_RULES
        ]
        self.rule_judge, self.rule_scorer = "verifiers", Scorer(ScoringConfig(rules=rules, use_reward_model=False))
        self.judge_sources["verifiers"] = [f"{Path(self.cfg.verifiers).name}:{f}" for f in VERIFIER_RULES]
        self.rule_rows = [i for i, r in enumerate(self.rows) if not self.rule_scorer.missing_columns(set(r))]
        needs = sorted({c for cols in self.rule_scorer.missing_columns(set()).values() for c in cols})
        if len(self.rule_rows) < len(self.rows):
            self.skipped["verifiers"] = (
                f"{len(self.rows) - len(self.rule_rows)} of {len(self.rows)} rows lack a "
                f"column the verifiers read ({', '.join(needs)}); they judge the other "
                f"{len(self.rule_rows)}"
            )
        if not self.rule_rows:
            self.rule_scorer = None
            if self.rm_scorer is None:
                raise ConfigError(
                    f"eval: no judge for these prompts: with no eval.scoring.rules the judges are the verifiers "
                    f"of {self.cfg.verifiers}, which need {' and '.join(needs)} columns that no row of "
                    f"eval.eval_data has, and there is no reward model. Set eval.scoring.reward_model (or run an "
                    f"rm stage before eval) and/or eval.scoring.rules with rules that read no metadata "
                    f"(e.g. {{path: reward/style.py, function: well_formed}})"
                )

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        prompts = [prompt_of(r) for r in self.rows]
        self.answers, self.judged, self.results = {}, {}, {}
        for name, path in self.models.items():
            self.log.info("[eval] %s: answering %d prompts (%s)", name, len(prompts), path)
            samples, model, tokenizer = self._answer(name, path, prompts)  # every rank: a collective under ranks
            if not self.ctx.is_main:
                continue  # rank 0 judges and writes
            texts = [s.text for s in samples]
            self.answers[name] = texts
            self.judged[name] = self._judge(prompts, texts)
            self.results[name] = {
                "path": path,
                **answer_metrics(self.rows, texts, self.verifiers, self.release_name),
                "finished_rate": round(sum(s.finished for s in samples) / len(samples), 4),
                "judge_means": {j: round(float(v.nanmean()), 4) for j, v in self.judged[name].items()},
                "memorisation": self._memorisation(path, model, tokenizer),
            }
            del model
        if self.baseline and self.ctx.is_main:
            for name in self.models:
                if name != self.baseline:
                    self.results[name]["win_rate"] = self._compare(name)
        return {}

    def _answer(self, name: str, path: str, prompts: list[list[dict]]):
        """One answer per prompt, plus the HF model and tokenizer when the backend loaded them."""
        c, ctx = self.cfg, self.ctx
        backend = c.sampling.backend
        try:
            self.engine = make_engine(path, c.sampling, ctx.device, ctx.precision, vllm=c.vllm, seed=self.seed)
        except Exception as err:  # name the model and the keys that fix it, whatever went wrong
            raise ConfigError(
                f"eval.models.{name} ({path}): cannot generate with backend {backend!r}: {err}. "
                f"Set eval.sampling.backend to 'hf' (it runs every family) or change "
                f"eval.models.{name}"
            ) from err
        sampling = c.sampling.model_copy(update={"seed": self.seed})
        engine = self.engine
        try:
            samples = [s[0] for s in generate_all(engine, prompts, sampling)]
        finally:
            self.cleanup()
        return samples, getattr(engine, "model", None), engine.tokenizer

    def _judge(self, prompts: list[list[dict]], texts: list[str]) -> dict:
        """Per-prompt score of each judge (NaN where it does not judge the row): the rules' weighted total,
        and the reward model's score."""
        judged = {}
        if self.rule_scorer is not None:
            idx = self.rule_rows
            scores = self.rule_scorer.score(
                [prompts[i] for i in idx], [texts[i] for i in idx], [self.rows[i] for i in idx]
            )
            values = torch.full((len(texts),), float("nan"))
            values[idx] = scores.total  # the rules' weighted sum (this scorer has no reward model, no normalising)
            judged[self.rule_judge] = values
        if self.rm_scorer is not None:
            judged["reward_model"] = self.rm_scorer.score(prompts, texts, self.rows).parts["reward_model"]
        return judged

    def _compare(self, name: str) -> dict:
        """Win rate of `name` against the baseline per judge, over the prompts that judge scored."""
        base, out = self.baseline, {}
        same = [a == b for a, b in zip(self.answers[name], self.answers[base])]
        for judge in self.judged[name]:
            mine, theirs = self.judged[name][judge], self.judged[base][judge]
            keep = [i for i in range(len(same)) if not (mine[i].isnan() or theirs[i].isnan())]
            out[judge] = compare(
                mine[keep].tolist(),
                theirs[keep].tolist(),
                self.cfg.bootstrap_samples,
                self.ctx.seed,
                same=[same[i] for i in keep],
            )
        return out

    def _memorisation(self, path: str, model, tokenizer) -> Optional[dict]:
        mc = self.cfg.memorisation
        if not self.train_rows:
            return None
        if model is None:  # vLLM answered; the probe needs token-id prompts on the HF model
            model = load_model(path, device=self.ctx.device, dtype=torch_dtype(self.ctx.precision)).eval()
        sequences = memorisation_sequences(
            tokenizer, self.train_rows, mc.prefix_tokens, mc.suffix_tokens, mc.num_examples, self.ctx.seed
        )
        if not sequences:
            self.skipped["memorisation"] = (
                f"none of the {len(self.train_rows)} training rows is {mc.prefix_tokens} + {mc.suffix_tokens} tokens "
                f"long ({self.ctx.name}.memorisation.prefix_tokens, suffix_tokens)"
            )
            return None
        return memorisation(
            model,
            sequences,
            mc.prefix_tokens,
            mc.suffix_tokens,
            tokenizer.pad_token_id,
            self.cfg.sampling.batch_size,
            mc.approximate_threshold,
        )

    # ------------------------------------------------------------------ save
    def _decoding(self) -> str:
        s = self.cfg.sampling
        how = (
            "greedy"
            if s.temperature == 0
            else f"sampled at temperature {s.temperature}, top-p {s.top_p}, seed {self.seed}"
        )
        return f"{how} answers of at most {s.max_new_tokens} tokens ({s.backend} backend)"

    def save(self) -> dict:
        d = self.ctx.dir
        if not self.ctx.is_main:
            return {}
        tasks = sorted({str(r["task"]) for r in self.rows if "task" in r})  # a data set's task may be a number
        results = {
            "baseline": self.baseline,
            "judges": list(next(iter(self.judged.values()))),
            "judge_sources": self.judge_sources,
            "num_prompts": len(self.rows),
            "decoding": self._decoding(),
            "tasks": tasks,
            "release_name": self.release_name,
            "models": self.results,
        }
        if self.skipped:
            results["skipped"] = self.skipped
        atomic_write_json(d / "results.json", results)
        atomic_write_text(d / "results.md", results_markdown(results))
        write_jsonl(
            d / "completions.jsonl",
            [
                {
                    "prompt": prompt_of(r),
                    **{k: r[k] for k in ("task", "answer") if k in r},
                    "completions": {name: texts[i] for name, texts in self.answers.items()},
                }
                for i, r in enumerate(self.rows)
            ],
        )
        plot_accuracy(results, d / "accuracy.png")
        plot_win_rates(results, d / "win_rate.png")
        return {"baseline": self.baseline, "models": {name: _headline(m) for name, m in self.results.items()}}


def _headline(m: dict) -> dict:
    """The numbers the pipeline summary shows for one model."""
    out = {
        "accuracy": (m["accuracy"] or {}).get("overall"),
        "refusal_rate": m["refusal_rate"],
        "over_refusal_rate": m["over_refusal_rate"],
        "identity": m["identity"],
    }
    out.update({f"win_rate_{judge}": cmp["win_rate"] for judge, cmp in (m.get("win_rate") or {}).items()})
    if m.get("memorisation"):
        out["memorised"] = m["memorisation"]["exact"]
    return out


STAGE = Eval
