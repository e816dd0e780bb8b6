"""warp: one iteration of WARP, Weight Averaged Rewarded Policies (Ramé et al. 2024, arXiv 2406.16768).

1. M PPO runs from the same init (the SFT policy) with different seeds, one after another, each in
   runs/run-<i>/ with WARP's EMA anchor (ppo.reference_mode defaults to `ema` here; an explicit `fixed`
   is respected). A run whose run.json says complete with the same fingerprint is skipped on a re-run;
   an interrupted run resumes from its own PPO checkpoints; a run made with other settings is redone.
2. SLERP of the task vectors d_m = theta_m - theta_init: merged = init + slerp(d_0, d_1, slerp_t), written
   by merging.merge_models("liti", [run-0, run-1], base=init, t, eta=1) into merged/. For M > 2 the paper
   applies SLERP iteratively; we merge run m (counting from 1) into the running result with t = 1/m, so
   every run gets the same share, as in a running mean. M = 1 skips SLERP (merged = the run).
3. LITI: theta_eta = init + eta (merged - init) for each eta in `etas` (merge_models "liti", one input).
4. Evaluation of the init, every run and every eta on the same held-out prompts: mean reward of sampled
   completions (scoring API), KL(pi || pi_init) estimated on those samples as the mean over samples of
   sum_t [log pi(y_t) - log pi_init(y_t)] (rollout.token_logprobs of both models, at the sampling
   temperature; completions are cut at sampling.max_new_tokens), and greedy oracle accuracy. Every model
   samples with the same seed, so the init and eta = 0 rows are identical.
   -> results.json, results.md, pareto.png (KL on x, reward on y).
5. The chosen eta's model is re-merged into model/, the stage output.
The paper's claim, measured and reported as found: merged policies lie on or above the straight line
from the init's (KL, reward) point to the runs' mean point (`line_check` in the metrics).
"""

from __future__ import annotations

import gc
import json
import math
import shutil
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
from pydantic import Field, model_validator

from ..chat import chat_prompt_ids
from ..config import ModelDir, Precision, RewardModelDir, Section
from ..data import DataSource, prompt_of, read_rows, source_fingerprint
from ..dist.rank import torch_dtype
from ..engines import HFEngine, SamplingConfig, make_engine
from ..models import load_model, load_tokenizer
from ..rollout import pack_rollout, token_logprobs
from ..manifest import atomic_write_json, atomic_write_text, hash_json, hash_path
from ..merging import ModelSource, merge_models
from ..scoring import Scorer, ScoringConfig
from .base import Stage, StageContext
from .warp_report import choose_eta, line_check, plot_pareto, results_markdown
from .ppo import PPO
from .ppo.config import PPOConfig

RUN_RECORD = "run.json"
"""Per-run record in runs/run-<i>/: status, fingerprint, seed and the run's PPO metrics."""
Eta = Annotated[float, Field(ge=0, le=1)]


class WarpPPOConfig(PPOConfig):
    """The PPO settings of every WARP run: the ppo stage's fields, two of them with WARP defaults."""

    reference_mode: Literal["fixed", "ema"] = "ema"
    """KL anchor: WARP's EMA of the policy (the default here); `fixed` (the init) only when set explicitly."""
    eval_samples: int = Field(0, ge=0)
    """Held-out prompts each run answers before and after (default 0: the warp stage evaluates every run)."""


class WarpConfig(Section):
    """Config of the warp stage."""

    model: ModelDir = None
    """Init of every run (the SFT policy); default: the latest earlier stage's model."""
    reward_model: RewardModelDir = None
    """Reward model for scoring; default: the rm stage's output when the pipeline has one."""
    train_data: DataSource = None
    """PPO prompts (any data source, as ppo.train_data); default: the data stage's train split."""
    eval_data: DataSource = None
    """Held-out prompts of the KL-reward table (any data source; answers not needed); default: the data stage's
    held-out split."""
    runs: int = Field(2, ge=1)
    """M, independent PPO runs from the init (1: no SLERP, LITI of the single run)."""
    seeds: Optional[list[int]] = None
    """One distinct seed per run; default: the pipeline seed + the run index."""
    ppo: WarpPPOConfig = WarpPPOConfig()
    """PPO settings of every run (model, data and seeds come from the warp section: leave those unset here)."""
    slerp_t: Optional[float] = Field(None, ge=0, le=1)
    """M = 2 only: SLERP position between run-0 (0) and run-1 (1), default 0.5. M > 2 uses t = 1/m (module doc)."""
    etas: list[Eta] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """LITI coefficients evaluated: init + eta (merged - init); 0 = the init, 1 = the SLERP merge."""
    choose: Literal["eta", "max_reward", "max_reward_under_kl"] = "eta"
    """The released eta: the fixed `eta`, the highest reward, or the highest reward with KL <= kl_budget."""
    eta: Eta = 0.5
    """The released eta when choose is `eta` (must be one of etas)."""
    kl_budget: Optional[float] = Field(None, ge=0)
    """Largest KL to the init (nats per completion) for choose: max_reward_under_kl."""
    eval_prompts: int = Field(64, ge=1)
    """Held-out prompts (the first N rows of eval_data) every model is evaluated on."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_new_tokens=32, n=2)
    """Evaluation sampling (temperature > 0, top_p 1: KL is estimated from its samples); seed default: pipeline's."""
    scoring: Optional[ScoringConfig] = None
    """Evaluation reward; default: ppo.scoring (running normalisation is always off in evaluation)."""
    precision: Optional[Precision] = None
    """fp32, bf16 or fp16 for the runs and the evaluation; None: the pipeline's `precision`."""
    keep_eta_models: bool = False
    """Keep every eta's model dir under liti/ (otherwise each is deleted once evaluated)."""

    @model_validator(mode="after")
    def _consistent(self) -> "WarpConfig":
        for key in ("model", "train_data", "eval_data", "seed"):
            if key in self.ppo.model_fields_set and getattr(self.ppo, key) is not None:
                where = "warp.seeds" if key == "seed" else f"warp.{key}"
                raise ValueError(f"warp.ppo.{key}: every run takes it from the warp section; set {where} instead")
        if self.ppo.distributed.num_processes > 1:
            raise ValueError("warp.ppo.distributed.num_processes: warp runs its PPO runs in this process; set 1")
        if self.seeds is not None and (len(self.seeds) != self.runs or len(set(self.seeds)) != self.runs):
            raise ValueError(f"warp.seeds: expected {self.runs} distinct seeds (one per run), got {self.seeds}")
        if self.slerp_t is not None and self.runs != 2:
            raise ValueError(
                f"warp.slerp_t: only used with runs: 2 (runs is {self.runs}; M > 2 merges run m "
                f"with t = 1/m); remove it"
            )
        if not self.etas or len(set(self.etas)) != len(self.etas):
            raise ValueError(f"warp.etas: expected a non-empty list of distinct values in [0, 1], got {self.etas}")
        if self.choose == "eta" and self.eta not in self.etas:
            raise ValueError(f"warp.eta: {self.eta} is not one of warp.etas {self.etas} (it must be evaluated)")
        if self.choose != "eta" and "eta" in self.model_fields_set:
            raise ValueError(f"warp.eta: only used with choose: eta (choose is {self.choose}); remove it")
        if (self.choose == "max_reward_under_kl") != (self.kl_budget is not None):
            raise ValueError("warp.kl_budget: required with choose: max_reward_under_kl, and used only there")
        if self.sampling.temperature <= 0 or self.sampling.top_p != 1.0:
            raise ValueError(
                "warp.sampling: temperature must be > 0 and top_p 1 (KL to the init is estimated from these samples)"
            )
        return self


# ----------------------------------------------------------------------------------------------
# Merging: SLERP of the runs' task vectors, then LITI toward the init


def slerp_runs(init: str | Path, runs: list[Path], out: Path, t: Optional[float] = None) -> dict:
    """init + SLERP of the runs' task vectors into `out` (the eta = 1 point); return the merge recipe.

    Two runs: t (default 0.5). More: iterative, run m (1-based) merged into the running result with
    t = 1/m. One: the run itself (LITI with eta 1).
    """
    if len(runs) == 1:
        return merge_models("liti", runs, out, base=init, eta=1.0)
    if len(runs) == 2:
        return merge_models("liti", runs, out, base=init, t=0.5 if t is None else t, eta=1.0)
    steps = out.parent / f".{out.name}.steps"
    shutil.rmtree(steps, ignore_errors=True)
    current = runs[0]
    try:
        for m in range(2, len(runs) + 1):
            target = out if m == len(runs) else steps / f"step-{m}"
            recipe = merge_models("liti", [current, runs[m - 1]], target, base=init, t=1.0 / m, eta=1.0)
            current = target
    finally:
        shutil.rmtree(steps, ignore_errors=True)
    return recipe


def task_vector_stats(init: str | Path, runs: list[Path]) -> dict:
    """Norms of the runs' task vectors and their pairwise cosines, streamed one tensor at a time."""
    sources = [ModelSource.open(p) for p in [init, *runs]]
    n = len(runs)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for name, (st_dtype, _) in sources[0].specs.items():
        if st_dtype not in ("F64", "F32", "F16", "BF16"):
            continue
        base = sources[0].read(name).double().reshape(-1)
        deltas = torch.stack([src.read(name).double().reshape(-1) - base for src in sources[1:]])
        gram += deltas @ deltas.T
    norms = gram.diagonal().sqrt()
    cosine = gram / torch.outer(norms, norms).clamp_min(1e-30)
    return {
        "norms": [round(x, 6) for x in norms.tolist()],
        "cosine": [[round(x, 6) for x in row] for row in cosine.tolist()],
    }


# ----------------------------------------------------------------------------------------------
# Evaluation: reward and KL to the init from the same samples, greedy accuracy


@torch.no_grad()
def sequence_kl(
    policy,
    reference,
    prompt_ids: list[list[int]],
    samples: list,
    pad_id: int,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per sample: sum over completion tokens of log pi(y_t) - log pi_ref(y_t) (a one-sample KL estimate)."""
    device, out = next(policy.parameters()).device, []
    for i in range(0, len(samples), batch_size):
        batch = pack_rollout(prompt_ids[i : i + batch_size], samples[i : i + batch_size], pad_id, device)
        mask = batch.response_mask
        diff = (token_logprobs(policy, batch, temperature) - token_logprobs(reference, batch, temperature)) * mask
        out.append(diff.sum(1).cpu())
    return torch.cat(out)


def _mean_sem(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    sem = values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else 0.0
    return round(values.mean().item(), 6), round(sem, 6)


class PolicyEvaluator:
    """Evaluates model dirs against the init on fixed held-out prompts, with a fixed sampling seed."""

    def __init__(
        self,
        init_dir: str,
        rows: list[dict],
        scorer,
        sampling: SamplingConfig,
        seed: int,
        device: torch.device,
        precision: str,
    ):
        self.rows, self.scorer, self.device, self.precision = rows, scorer, device, precision
        self.sampling = sampling.model_copy(update={"seed": seed if sampling.seed is None else sampling.seed})
        self.tokenizer = load_tokenizer(init_dir)
        self.init = self._load(init_dir)
        self.prompts = [prompt_of(r) for r in rows]
        self.prompt_ids = [chat_prompt_ids(self.tokenizer, p) for p in self.prompts]
        self.vllm = None
        if sampling.backend == "vllm":  # one engine for every model: weights are swapped in per model
            self.vllm = make_engine(
                init_dir, self.sampling, device, precision, tokenizer=self.tokenizer, seed=self.sampling.seed
            )

    def _load(self, model_dir: str):
        return load_model(model_dir, device=self.device, dtype=torch_dtype(self.precision)).eval().requires_grad_(False)

    def _generate(self, model, model_dir: str, sampling: SamplingConfig) -> list[list]:
        if self.vllm is None:
            return HFEngine(model, self.tokenizer, self.precision).generate(self.prompts, sampling)
        self.vllm.load_weights_from_dir(model_dir)
        return self.vllm.generate(self.prompts, sampling)

    def evaluate(self, model_dir: Optional[str] = None) -> dict:
        """reward, KL to the init (mean and standard error over samples), accuracy, finished share and
        length of `model_dir` (None: the init itself)."""
        from ..tasks import answer_accuracy

        model = self.init if model_dir is None else self._load(model_dir)
        model_dir = model_dir or (self.vllm and self.vllm.model_dir)
        n = self.sampling.n
        samples = [s for group in self._generate(model, model_dir, self.sampling) for s in group]
        rows = [r for r in self.rows for _ in range(n)]
        prompts, ids = [p for p in self.prompts for _ in range(n)], [p for p in self.prompt_ids for _ in range(n)]
        reward = self.scorer.score(prompts, [s.text for s in samples], rows).total
        kl = sequence_kl(
            model,
            self.init,
            ids,
            samples,
            self.tokenizer.pad_token_id,
            self.sampling.temperature,
            self.sampling.batch_size,
        )
        greedy = self.sampling.model_copy(update={"temperature": 0.0, "n": 1})
        texts = [g[0].text for g in self._generate(model, model_dir, greedy)]
        accuracy = answer_accuracy(self.rows, texts)["overall"] if all("answer" in r for r in self.rows) else None
        (r_mean, r_sem), (kl_mean, kl_sem) = _mean_sem(reward), _mean_sem(kl)
        return {
            "reward": r_mean,
            "reward_sem": r_sem,
            "kl": kl_mean,
            "kl_sem": kl_sem,
            "accuracy": accuracy,
            "finished": round(sum(s.finished for s in samples) / len(samples), 4),
            "length": round(sum(len(s.token_ids) for s in samples) / len(samples), 2),
        }

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()


# ----------------------------------------------------------------------------------------------
# The stage


def _input_hash(value) -> str:
    """A run's input, fingerprinted: a path by its content, a data source (a mapping, a mixture, a pattern)
    as the pipeline does."""
    if isinstance(value, str) and Path(value).exists():
        return hash_path(value)
    return source_fingerprint(value)


class Warp(Stage):
    name = "warp"
    Config = WarpConfig
    consumes = {"model": "model", "reward_model": "reward_model", "train_data": "train_data", "eval_data": "eval_data"}
    optional_inputs = {"reward_model"}
    produces = {"model": "model"}

    def setup(self) -> None:
        c, inp = self.cfg, self.ctx.inputs
        self.init_dir = inp["model"]
        self.seeds = c.seeds or [self.ctx.seed + i for i in range(c.runs)]
        self.eval_rows = read_rows(inp["eval_data"], "prompt", seed=self.ctx.seed)[: c.eval_prompts]
        scoring = c.scoring or c.ppo.scoring
        if scoring.rules:  # before the M runs: a rule that reads a column the held-out rows lack fails now
            key = f"{self.ctx.name}.{'scoring' if c.scoring else 'ppo.scoring'}"
            rules = Scorer(scoring.model_copy(update={"use_reward_model": False}))
            rules.check_rows(self.eval_rows, f"{self.ctx.name}.eval_data", key, rm_stage=True)
        files = {k: _input_hash(v) for k, v in inp.items() if k != "eval_data"}
        files.update({r.path: hash_path(r.path) for r in c.ppo.scoring.rules if Path(r.path).exists()})
        # As the pipeline does: defaults are not hashed, so a new ppo field (whose default keeps the old
        # behaviour) does not invalidate finished runs.
        self.run_base_fp = {"ppo": c.ppo.model_dump(mode="json", exclude_defaults=True), "files": files}

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        runs = [self._ppo_run(i, seed) for i, seed in enumerate(self.seeds)]
        run_models = [d for d, _, _ in runs]
        self.merged = self.ctx.dir / "merged"
        slerp_runs(self.init_dir, run_models, self.merged, self.cfg.slerp_t)
        scoring = (self.cfg.scoring or self.cfg.ppo.scoring).model_copy(update={"normalize": False})
        ctx = self.ctx
        scorer = Scorer(
            scoring, reward_model_dir=ctx.inputs.get("reward_model"), device=ctx.device, precision=ctx.precision
        )
        evaluator = PolicyEvaluator(
            self.init_dir, self.eval_rows, scorer, self.cfg.sampling, ctx.seed, ctx.device, ctx.precision
        )
        try:
            self.rows = self._evaluate_all(evaluator, run_models)
        finally:
            evaluator.close()
        keys = ("reward_first", "reward_last", "kl_last")
        return {
            "runs": [
                {"seed": seed, "skipped": skipped, **{k: m.get(k) for k in keys}}
                for seed, (_, m, skipped) in zip(self.seeds, runs)
            ],
            "runs_skipped": [i for i, (_, _, skipped) in enumerate(runs) if skipped],
            "task_vectors": task_vector_stats(self.init_dir, run_models),
        }

    def _ppo_run(self, index: int, seed: int) -> tuple[Path, dict, bool]:
        """Run PPO run `index` (or skip it: its record says complete with this fingerprint); return
        (its model dir, its PPO metrics, skipped)."""
        run_dir = self.ctx.dir / "runs" / f"run-{index}"
        fp = hash_json({**self.run_base_fp, "seed": seed})
        record = _read_json(run_dir / RUN_RECORD)
        if record.get("status") == "complete" and record.get("fingerprint") == fp and (run_dir / "model").is_dir():
            self.log.info("[warp] run-%d (seed %d) complete, skipped", index, seed)
            return run_dir / "model", record["metrics"], True
        if run_dir.exists() and record.get("fingerprint") != fp:  # other settings (or unknown): start afresh
            self.log.info("[warp] run-%d: settings changed, clearing %s", index, run_dir)
            shutil.rmtree(run_dir)
        atomic_write_json(run_dir / RUN_RECORD, {"status": "running", "fingerprint": fp, "seed": seed})
        inputs = {k: v for k, v in self.ctx.inputs.items() if k != "eval_data" or self.cfg.ppo.eval_samples}
        ctx = StageContext(
            name=f"{self.ctx.name}/run-{index}",
            dir=run_dir,
            inputs=inputs,
            seed=seed,
            pipeline=self.ctx.pipeline,
            log=self.log,
            device=self.ctx.device,
            device_request=self.ctx.device_request,
            precision=self.ctx.precision,
        )
        self.log.info("[warp] run-%d (seed %d) -> %s", index, seed, run_dir)
        stage = PPO(self.cfg.ppo, ctx)
        try:
            metrics = stage.run()
        finally:
            stage.cleanup()  # a vLLM engine holds memory the next run needs
            del stage
            gc.collect()
        atomic_write_json(
            run_dir / RUN_RECORD, {"status": "complete", "fingerprint": fp, "seed": seed, "metrics": metrics}
        )
        return run_dir / "model", metrics, False

    def _evaluate_all(self, evaluator: PolicyEvaluator, run_models: list[Path]) -> list[dict]:
        rows = [{"name": "init", "kind": "init", "eta": None, **evaluator.evaluate()}]
        for i, (model_dir, seed) in enumerate(zip(run_models, self.seeds)):
            rows.append(
                {"name": f"run-{i}", "kind": "run", "eta": None, "seed": seed, **evaluator.evaluate(str(model_dir))}
            )
            self.log.info("[warp] %s: %s", rows[-1]["name"], rows[-1])
        for eta in self.cfg.etas:
            out = self.ctx.dir / "liti" / f"eta-{eta:g}"
            merge_models("liti", [self.merged], out, base=self.init_dir, eta=eta)
            rows.append({"name": f"eta={eta:g}", "kind": "liti", "eta": eta, **evaluator.evaluate(str(out))})
            self.log.info("[warp] %s: %s", rows[-1]["name"], rows[-1])
            if not self.cfg.keep_eta_models:
                shutil.rmtree(out)
        init, runs = rows[0], [r for r in rows if r["kind"] == "run"]
        for r in rows:
            r["margin"] = line_check(init, runs, r)["margin"] if r["kind"] == "liti" else None
        return rows

    # ------------------------------------------------------------------ save
    def save(self) -> dict:
        c, rows = self.cfg, self.rows
        liti = [r for r in rows if r["kind"] == "liti"]
        chosen, why = choose_eta(liti, c.choose, c.eta, c.kl_budget)
        if why.startswith("no eta"):
            self.log.warning("[warp] %s", why)
        merge_models("liti", [self.merged], self.ctx.dir / "model", base=self.init_dir, eta=chosen)
        init, runs = rows[0], [r for r in rows if r["kind"] == "run"]
        top = max(liti, key=lambda r: r["eta"])  # eta = 1, the SLERP merge itself, when it is among the etas
        check = {"eta": top["eta"], **line_check(init, runs, top)}
        self.log.info("[warp] line check: %s", check)
        atomic_write_json(
            self.ctx.dir / "results.json",
            {"rows": rows, "chosen_eta": chosen, "chosen_because": why, "line_check": check, "seeds": self.seeds},
        )
        atomic_write_text(self.ctx.dir / "results.md", results_markdown(rows, check, chosen, why))
        plot_pareto(rows, self.ctx.dir / "pareto.png", chosen)
        chosen_row = next(r for r in liti if r["eta"] == chosen)
        return {
            "chosen_eta": chosen,
            "chosen_because": why,
            "chosen": chosen_row,
            "line_check": check,
            "etas_above_line": [r["eta"] for r in liti if r["margin"] is not None and r["margin"] >= 0],
            "table": {r["name"]: {"kl": r["kl"], "reward": r["reward"], "accuracy": r["accuracy"]} for r in rows},
        }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


STAGE = Warp
