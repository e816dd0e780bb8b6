"""synth: generate a verifiable instruction data set from a recipe (prompts + oracle answers).

Recipe (YAML, data/recipes/*.yaml): which tasks, their weights and parameters, and the release
identity. Output: train.jsonl and eval.jsonl (no prompt in both) plus card.json (counts, lengths).
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Optional

from pydantic import Field

from ..config import ConfigError, FilePath, InputPath, ModelDir, Precision, ProcessesConfig, Section
from ..data import write_jsonl
from ..engines import SamplingConfig, VLLMOptions, generate_all, make_engine
from ..manifest import atomic_write_json
from ..tasks import TASKS, make_example, normalise_answer
from .base import Stage


TEACHER_MISTAKES = ("off_by_one", "shuffle", "truncate")
"""Answer-level mistakes a simulated teacher makes (prefs.corrupt kinds); never refusals or identity."""


class TaskSpec(Section):
    """One task of a recipe."""

    task: str
    """Task name (one of posttrain.tasks.TASKS)."""
    weight: float = Field(1.0, gt=0)
    """Relative share of examples."""
    params: dict = {}
    """Keyword parameters of the task generator (e.g. max_value for add)."""


class Recipe(Section):
    """A data recipe file."""

    name: str = "recipe"
    """Recipe name, recorded in the data card."""
    identity: dict = {}
    """Release identity (name, maker) passed to the identity task."""
    refusal: str = "I can't help with that."
    """The answer the safety slice teaches for harmful requests."""
    tasks: list[TaskSpec]
    """Tasks to mix."""



def eval_counts(sizes: list[int], num_eval: int) -> list[int]:
    """Held-out rows per task: each task's share of `num_eval`, at least 1 and never all of a task's rows;
    rounding is corrected by largest remainder, so the counts add up to `num_eval` whenever they can."""
    ideal = [num_eval * n / sum(sizes) for n in sizes]
    counts = [min(n - 1, max(1, round(x))) if n > 1 else 0 for n, x in zip(sizes, ideal)]
    while sum(counts) != num_eval:
        step = 1 if sum(counts) < num_eval else -1
        room = [i for i, (c, n) in enumerate(zip(counts, sizes)) if (c < n - 1 if step > 0 else c > 1)]
        if not room:
            break
        i = max(room, key=lambda j: step * (ideal[j] - counts[j]))  # furthest below (above) its share
        counts[i] += step
    return counts


class SynthConfig(Section):
    """Config of the synth stage."""

    recipe: FilePath = None
    """Recipe YAML naming tasks, weights and parameters (e.g. data/recipes/quickstart.yaml)."""
    num_train: int = Field(2000, ge=1)
    """Training examples to generate."""
    num_eval: int = Field(200, ge=1)
    """Held-out examples (no prompt shared with train)."""
    seed: Optional[int] = None
    """Seed of the generator; default: the pipeline seed."""
    teacher: ModelDir = None
    """Local model directory that writes the training responses (the Gemma recipe: prompts in, a
    stronger model's answers out); default: the tasks' oracle answers. Held-out rows keep the oracle."""
    teacher_sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_new_tokens=64)
    """How the teacher samples (backend hf or vllm)."""
    vllm: VLLMOptions = VLLMOptions()
    """vLLM engine settings for the teacher when teacher_sampling.backend=vllm."""
    distributed: ProcessesConfig = ProcessesConfig()
    """Ranks sharing the teacher's generation (vLLM engines colocated per rank; rank 0 writes)."""
    precision: Optional[Precision] = None
    """Dtype the teacher runs in; None: the pipeline's `precision`."""
    teacher_error_rate: float = Field(0.0, ge=0, lt=1)
    """Without a teacher model: the share of verifiable training answers the simulated teacher gets wrong,
    with the task's typical mistake (off by one, a shuffled list, a dropped letter), as real teachers do.
    The `answer` column and the held-out split keep the oracle; PPO against the verifiers undoes them."""


def load_recipe(path: str) -> Recipe:
    from ..config import load_config

    recipe = load_config(Recipe, path)
    unknown = [t.task for t in recipe.tasks if t.task not in TASKS]
    if unknown:
        raise ConfigError(f"{path}: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    return recipe


class Synth(Stage):
    name = "synth"
    Config = SynthConfig
    produces = {"train_data": "train.jsonl", "eval_data": "eval.jsonl"}

    def setup(self) -> None:
        if not self.cfg.recipe:
            raise ConfigError("synth.recipe: set a recipe file, e.g. data/recipes/quickstart.yaml")
        if self.cfg.teacher and self.cfg.teacher_error_rate:
            raise ConfigError("synth.teacher_error_rate simulates a teacher's mistakes; a real synth.teacher "
                              "makes its own: set one of the two")
        self.recipe = load_recipe(self.cfg.recipe)
        self.rng = random.Random(self.cfg.seed if self.cfg.seed is not None else self.ctx.seed)

    def _params(self, spec: TaskSpec) -> dict:
        extra = {"identity": self.recipe.identity, "safety": {"refusal": self.recipe.refusal}}
        return {**extra.get(spec.task, {}), **spec.params}

    def train(self) -> dict:
        """Draw distinct prompts by task weight, then split each task's prompts train/eval.

        Splitting per task keeps small slices (identity, safety) in both splits; no prompt is in both.
        """
        specs = self.recipe.tasks
        weights = [s.weight for s in specs]
        want = self.cfg.num_train + self.cfg.num_eval
        by_task: dict[str, list[dict]] = {}
        seen, attempts = set(), 0
        while len(seen) < want and attempts < 50 * want:
            attempts += 1
            spec = self.rng.choices(specs, weights)[0]
            row = make_example(spec.task, self.rng, **self._params(spec))
            key = row["messages"][0]["content"]
            if key not in seen:
                seen.add(key)
                by_task.setdefault(spec.task, []).append(row)
        if len(seen) < want:
            raise RuntimeError(f"recipe {self.cfg.recipe} yields only {len(seen)} distinct prompts; "
                               f"{want} asked (lower num_train/num_eval or widen task parameters)")
        self.train_rows, self.eval_rows = [], []
        groups = list(by_task.values())
        for rows, n_eval in zip(groups, eval_counts([len(r) for r in groups], self.cfg.num_eval)):
            self.eval_rows += rows[:n_eval]
            self.train_rows += rows[n_eval:]
        self.rng.shuffle(self.train_rows)
        self.rng.shuffle(self.eval_rows)
        metrics = {"num_train": len(self.train_rows), "num_eval": len(self.eval_rows)}
        if self.cfg.teacher:
            metrics["teacher"] = self._teacher_responses()
        elif self.cfg.teacher_error_rate:
            metrics["teacher_errors"] = self._simulated_teacher_errors()
        return metrics

    def _simulated_teacher_errors(self) -> int:
        """Replace `teacher_error_rate` of the training answers that have a typical mistake with it."""
        from .prefs import CORRUPTIONS_FOR_TASK, corrupt

        seed = self.cfg.seed if self.cfg.seed is not None else self.ctx.seed
        rng, errors = random.Random(f"teacher-errors-{seed}"), 0
        for row in self.train_rows:
            kinds = [k for k in CORRUPTIONS_FOR_TASK.get(row["task"], []) if k in TEACHER_MISTAKES]
            if kinds and rng.random() < self.cfg.teacher_error_rate:
                wrong = corrupt(row["answer"], kinds[0], rng)
                if wrong is not None:
                    row["messages"][-1] = {"role": "assistant", "content": wrong}
                    row["source"] = "teacher_error"
                    errors += 1
        return errors

    def _teacher_responses(self) -> dict:
        """Replace each training response with the teacher's; the oracle answer stays as metadata
        (`answer`) so verifiers and filters can judge what the teacher wrote."""
        c, ctx = self.cfg, self.ctx
        self.engine = make_engine(str(c.teacher), c.teacher_sampling, ctx.device, ctx.precision, vllm=c.vllm,
                                  seed=ctx.seed)
        prompts = [r["messages"][:-1] for r in self.train_rows]
        samples = generate_all(self.engine, prompts, c.teacher_sampling)
        self.cleanup()
        for row, (sample, *_) in zip(self.train_rows, samples):
            row["messages"][-1] = {"role": "assistant", "content": sample.text}
            row["finished"] = sample.finished
            row["source"] = "teacher"
        agree = sum(normalise_answer(r["messages"][-1]["content"]) == normalise_answer(r["answer"])
                    for r in self.train_rows)
        return {"model": str(self.cfg.teacher), "agrees_with_oracle": round(agree / len(self.train_rows), 4),
                "unfinished": sum(not r["finished"] for r in self.train_rows)}

    def save(self) -> dict:
        d = self.ctx.dir
        if not self.ctx.is_main:
            return {}
        write_jsonl(d / "train.jsonl", self.train_rows)
        write_jsonl(d / "eval.jsonl", self.eval_rows)
        card = data_card(self.train_rows, self.eval_rows, self.recipe.name)
        atomic_write_json(d / "card.json", card)
        return {"tasks": card["train"]["per_task"]}


def data_card(train: list[dict], evals: list[dict], recipe: str) -> dict:
    def stats(rows):
        lens = sorted(len(r["messages"][-1]["content"]) for r in rows)
        return {"rows": len(rows), "per_task": dict(Counter(r.get("task", "?") for r in rows)),
                "response_chars": {"min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]}}
    return {"recipe": recipe, "train": stats(train), "eval": stats(evals)}


STAGE = Synth
