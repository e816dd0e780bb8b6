"""synth: the training data, from a recipe of verifiable tasks or from the user's own prompts.

- `recipe` (YAML, data/recipes/*.yaml): which tasks, their weights and parameters, and the release identity;
  prompts with oracle answers (optionally re-answered by a teacher model, or a simulated one that errs).
- `prompts` (a data source) with `teacher` (a model directory): the teacher answers every distinct prompt,
  in resumable shards (synth_prompts.py).
Output: train.jsonl and eval.jsonl (no prompt in both) plus card.json (counts, lengths).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Optional

from pydantic import Field, model_validator

from ..config import ConfigError, FilePath, ModelDir, Precision, ProcessesConfig, Section
from ..data import DataSource, source_json, write_jsonl
from ..engines import SamplingConfig, VLLMOptions, generate_all, make_engine
from ..manifest import atomic_write_json
from ..tasks import TASKS, make_example, normalise_answer, param_errors
from .base import Stage
from .synth_prompts import ShardedAnswers, answered_rows, read_prompt_set


TEACHER_MISTAKES = ("off_by_one", "shuffle", "truncate")
"""Answer-level mistakes a simulated teacher makes (prefs.corrupt kinds); never refusals or identity."""


class TaskSpec(Section):
    """One task of a recipe."""

    task: str
    """Task name (one of posttrain.tasks.TASKS)."""
    weight: float = Field(1.0, gt=0)
    """Relative share of examples."""
    params: dict = {}
    """Keyword parameters of the task generator (e.g. max_value for add), checked against its signature."""


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
    """Recipe YAML naming tasks, weights and parameters (e.g. data/recipes/quickstart.yaml); or set prompts."""
    prompts: DataSource = None
    """Your own prompts (path, mapping or mixture; answers in the source are dropped) for `teacher` to answer."""
    num_train: int = Field(2000, ge=1)
    """Training examples to generate (recipe only: with prompts, every prompt not held out is trained on)."""
    num_eval: int = Field(200, ge=1)
    """Held-out examples (no prompt shared with train)."""
    eval_fraction: Optional[float] = Field(None, gt=0, lt=1)
    """With prompts: the share of distinct prompts held out, instead of num_eval."""
    shard_size: int = Field(256, ge=1)
    """With prompts: prompts per shard of teacher answers (run_dir/synth/shards/); a rerun after a crash
    answers only the shards not yet written."""
    seed: Optional[int] = None
    """Seed of the generator; default: the pipeline seed."""
    teacher: ModelDir = None
    """Local model directory that writes the responses (the Gemma recipe: prompts in, a stronger model's
    answers out). Recipe: training rows only (held-out rows keep the oracle); default: the oracle answers.
    Prompts: required, answers every prompt."""
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

    @model_validator(mode="after")
    def _one_source(self):
        if self.recipe and self.prompts:
            raise ValueError(
                "recipe and prompts are alternatives: set synth.recipe (generated tasks) or "
                "synth.prompts (your prompts, answered by synth.teacher), not both"
            )
        if self.prompts and not self.teacher:
            raise ValueError(
                "synth.prompts needs synth.teacher: a model directory whose answers become the "
                "responses (prompts alone have nothing to train on)"
            )
        if self.teacher and self.teacher_error_rate:  # prompts need a teacher, so this covers them too
            raise ValueError(
                "teacher_error_rate simulates a teacher's mistakes; a real synth.teacher makes its "
                "own: set one of the two"
            )
        # compared with the default, not with model_fields_set: ranks re-validate a full dump of the config
        if self.prompts and self.num_train != type(self).model_fields["num_train"].default:
            raise ValueError(
                "num_train applies to recipes; with prompts every prompt not held out is trained on "
                "(take fewer with a source limit, e.g. prompts: {path: ..., limit: 1000})"
            )
        if self.eval_fraction is not None and not self.prompts:
            raise ValueError("eval_fraction applies to prompts; a recipe holds out num_eval examples")
        if self.prompts and self.teacher_sampling.n != 1:
            raise ValueError("teacher_sampling.n must be 1: the teacher writes one answer per prompt")
        return self


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe: its keys and types, its task names, and every parameter a generator will get
    (a task's `params`, `identity`, `refusal`) against the generator's signature; errors name the key and line."""
    from ..config import load_config, read_yaml

    recipe = load_config(Recipe, path)
    unknown = [t.task for t in recipe.tasks if t.task not in TASKS]
    if unknown:
        raise ConfigError(f"{path}: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    errors = recipe_param_errors(recipe)
    if errors:
        _, lines = read_yaml(path)
        listed = [f"  {'.'.join(map(str, loc))}: {what}  [{path}:{_line(lines, loc)}]" for loc, what in errors]
        raise ConfigError(f"invalid recipe {path}:\n" + "\n".join(listed))
    return recipe


def recipe_param_errors(recipe: Recipe) -> list[tuple[tuple, str]]:
    """(key path in the recipe file, problem) for each parameter a task generator would get wrong: generators
    take no catch-all keyword, so an unknown key would otherwise fail mid-run, naming neither file nor key."""
    found = [(("identity", k), what) for k, what in param_errors("identity", recipe.identity).items()]
    found += [(("refusal",), what) for what in param_errors("safety", {"refusal": recipe.refusal}).values()]
    for i, spec in enumerate(recipe.tasks):
        found += [(("tasks", i, "params", k), what) for k, what in param_errors(spec.task, spec.params).items()]
    return found


def _line(lines: dict, loc: tuple) -> int | str:
    """The YAML line of `loc`, else of its nearest enclosing key (a default has no line of its own)."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return "?"


class Synth(Stage):
    name = "synth"
    Config = SynthConfig
    consumes = {"prompts": "prompts"}
    optional_inputs = {"prompts"}
    produces = {"train_data": "train.jsonl", "eval_data": "eval.jsonl"}

    @classmethod
    def check_plan(cls, name: str, cfg, inputs: dict, artifacts: dict, kinds: dict) -> None:
        if not cfg.recipe:
            return
        try:  # a small file, read now: a bad recipe stops the run (and `posttrain show`) before any stage works
            load_recipe(cfg.recipe)
        except ConfigError as err:
            raise ConfigError(f"{name}.recipe: {err}") from None

    @property
    def seed(self) -> int:
        return self.cfg.seed if self.cfg.seed is not None else self.ctx.seed

    def setup(self) -> None:
        self.recipe = None
        if self.cfg.prompts:
            return  # read in train(): the teacher answers them there
        if not self.cfg.recipe:
            raise ConfigError(
                "synth: set synth.recipe (a recipe file, e.g. data/recipes/quickstart.yaml) or "
                "synth.prompts (your prompts) with synth.teacher (a model that answers them)"
            )
        self.recipe = load_recipe(self.cfg.recipe)
        self.rng = random.Random(self.seed)

    def _params(self, spec: TaskSpec) -> dict:
        extra = {"identity": self.recipe.identity, "safety": {"refusal": self.recipe.refusal}}
        return {**extra.get(spec.task, {}), **spec.params}

    def train(self) -> dict:
        """Draw distinct prompts by task weight, then split each task's prompts train/eval.

        Splitting per task keeps small slices (identity, safety) in both splits; no prompt is in both.
        """
        if self.cfg.prompts:
            return self._answer_prompts()
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
            raise RuntimeError(
                f"recipe {self.cfg.recipe} yields only {len(seen)} distinct prompts; "
                f"{want} asked (lower num_train/num_eval or widen task parameters)"
            )
        self.train_rows, self.eval_rows = [], []
        groups = list(by_task.values())
        for rows, n_eval in zip(groups, eval_counts([len(r) for r in groups], self.cfg.num_eval)):
            self.eval_rows += rows[:n_eval]
            self.train_rows += rows[n_eval:]
        self.rng.shuffle(self.train_rows)
        self.rng.shuffle(self.eval_rows)
        answers = {}
        if self.cfg.teacher:  # before counting: the teacher's empty answers are dropped
            answers["teacher"] = self._teacher_responses()
        elif self.cfg.teacher_error_rate:
            answers["teacher_errors"] = self._simulated_teacher_errors()
        return {"num_train": len(self.train_rows), "num_eval": len(self.eval_rows), **answers}

    def _simulated_teacher_errors(self) -> int:
        """Replace `teacher_error_rate` of the training answers that have a typical mistake with it."""
        from .prefs import CORRUPTIONS_FOR_TASK, corrupt

        rng, errors = random.Random(f"teacher-errors-{self.seed}"), 0
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
        (`answer`) so verifiers and filters can judge what the teacher wrote. A row the teacher left empty is
        dropped and counted, by the prompts path's own code (`answered_rows`)."""
        c, ctx = self.cfg, self.ctx
        self.engine = make_engine(
            str(c.teacher), c.teacher_sampling, ctx.device, ctx.precision, vllm=c.vllm, seed=ctx.seed
        )
        prompt_rows = [{**r, "messages": r["messages"][:-1]} for r in self.train_rows]
        samples = generate_all(self.engine, [r["messages"] for r in prompt_rows], c.teacher_sampling)
        self.cleanup()
        answers = [{"text": s.text, "finished": s.finished} for s, *_ in samples]
        agree = sum(normalise_answer(a["text"]) == normalise_answer(r["answer"]) for a, r in zip(answers, prompt_rows))
        rows, empty = answered_rows(prompt_rows, answers)  # as the prompts path: an empty answer's row is dropped
        self.train_rows = [{**r, "source": "teacher"} for r in rows if r is not None]
        self._check_rows_left(empty, len(rows))
        return {
            "model": str(self.cfg.teacher),
            "agrees_with_oracle": round(agree / len(answers), 4),  # of all its answers: an empty one disagrees
            "unfinished": sum(not r["finished"] for r in self.train_rows),
            "empty_answers_dropped": empty,
        }

    def _check_rows_left(self, empty: int, answered: int) -> None:
        """Stop when the teacher's empty answers, dropped (a conversation turn must have content), leave a split
        with no rows: training on nothing would fail later, far from the cause."""
        if not self.train_rows or not self.eval_rows:
            raise RuntimeError(
                f"synth: the teacher {self.cfg.teacher} gave empty answers to {empty} of {answered} "
                f"prompts, leaving {len(self.train_rows)} train and {len(self.eval_rows)} held-out rows"
            )

    def _answer_prompts(self) -> dict:
        """The teacher answers every distinct prompt of `prompts` (sharded, resumable); then the split."""
        c, ctx = self.cfg, self.ctx
        distinct, held, self.prompt_counts = read_prompt_set(
            ctx.inputs["prompts"], c.num_eval, c.eval_fraction, self.seed
        )
        base_seed = c.teacher_sampling.seed if c.teacher_sampling.seed is not None else self.seed

        def generate(prompts: list[list[dict]], first: int) -> list[tuple[str, bool]]:
            if self.engine is None:  # loaded only when a shard is missing: a finished resume loads nothing
                self.engine = make_engine(
                    str(c.teacher), c.teacher_sampling, ctx.device, ctx.precision, vllm=c.vllm, seed=self.seed
                )
            # seeded by the shard's first prompt position: a shard answered after a resume is the same
            sampling = c.teacher_sampling.model_copy(update={"seed": base_seed + first})
            return [(s[0].text, s[0].finished) for s in generate_all(self.engine, prompts, sampling)]

        self.engine = None
        shards = ShardedAnswers(ctx.dir / "shards", [r["messages"] for r in distinct], c.shard_size, ctx.is_main)
        answers, progress = shards.run(generate)
        self.cleanup()
        if not ctx.is_main:
            self.train_rows = self.eval_rows = []
            return {}
        rows, empty = answered_rows(distinct, answers)
        self.train_rows = [r for r, h in zip(rows, held) if r is not None and not h]
        self.eval_rows = [r for r, h in zip(rows, held) if r is not None and h]
        self._check_rows_left(empty, len(rows))
        kept = self.train_rows + self.eval_rows
        self.teacher_counts = {
            "model": str(c.teacher),
            "unfinished": sum(not r["finished"] for r in kept),
            "empty_answers_dropped": empty,
            **progress,
        }
        return {
            "num_train": len(self.train_rows),
            "num_eval": len(self.eval_rows),
            "prompts": self.prompt_counts,
            "teacher": self.teacher_counts,
        }

    def save(self) -> dict:
        d = self.ctx.dir
        if not self.ctx.is_main:
            return {}
        write_jsonl(d / "train.jsonl", self.train_rows)
        write_jsonl(d / "eval.jsonl", self.eval_rows)
        if self.recipe is not None:
            card = data_card(self.train_rows, self.eval_rows, self.recipe.name)
            atomic_write_json(d / "card.json", card)
            return {"tasks": card["train"]["per_task"]}
        source = source_json(self.cfg.prompts)
        card = {
            "prompts": source,
            "prompt_counts": self.prompt_counts,
            "teacher": self.teacher_counts,
            **data_card(self.train_rows, self.eval_rows, None),
        }
        atomic_write_json(d / "card.json", card)
        return {}


def data_card(train: list[dict], evals: list[dict], recipe: Optional[str]) -> dict:
    """Rows, rows per task (when rows have a task) and answer lengths of each split."""

    def stats(rows):
        lens = sorted(len(r["messages"][-1]["content"]) for r in rows)
        tasks = {"per_task": dict(Counter(r.get("task", "?") for r in rows))} if any("task" in r for r in rows) else {}
        return {
            "rows": len(rows),
            **tasks,
            "response_chars": {"min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]},
        }

    return {**({"recipe": recipe} if recipe is not None else {}), "train": stats(train), "eval": stats(evals)}


STAGE = Synth
