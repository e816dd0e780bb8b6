"""merge: combine model directories into one (checkpoint averaging, EMA, SLERP, task arithmetic, TIES,
DARE, LITI/WARP), tensor by tensor, through posttrain.merging.merge_models.

Inputs, in order: the latest earlier stage's model (unless `use_latest_model: false`), then each entry of
`models`. An entry is a path (a model dir, a LoRA adapter dir, or a folder of checkpoint-N dirs), or an
artifact reference `<stage>.<kind>` such as `sft.model`, read from that stage's manifest in this run
directory when the merge runs, so a pipeline can merge models its earlier stages have not produced yet
when the config is loaded. `base` takes the same two forms.

Output in run_dir/merge/: model/ (a complete model dir with merge_recipe.json inside). The recipe is also
the stage's metrics: method, backend taken, inputs with their hashes, weights and every setting used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from ..config import ConfigError, ModelRef, Section, ShardSize, is_reference
from ..merge_inputs import expand_checkpoints, folder_note, whole_shards
from ..merging import METHODS, MergeError, check_settings, merge_models
from .base import Stage


class MergeConfig(Section):
    """Config of the merge stage."""

    method: Literal[METHODS] = "linear"  # type: ignore[valid-type]
    """linear | ema | slerp | task_arithmetic | ties | dare | liti (liti with two models = WARP's merge)."""
    models: list[ModelRef] = []
    """Model dirs, adapter dirs, checkpoint folders or artifact references, merged after the latest model."""
    use_latest_model: bool = True
    """Put the latest earlier stage's model artifact first among the inputs (when there is one)."""
    base: ModelRef = None
    """Base / init model for task_arithmetic, ties, dare and liti (a path or a reference like 'sft.model')."""
    weights: Optional[list[float]] = None
    """One weight per input (linear: mixing weights, default uniform; task-vector methods: lambdas, default 1)."""
    normalize: bool = True
    """linear: divide the weights by their sum (off: they must already sum to 1)."""
    allow_negative_weights: bool = False
    """Permit negative weights (extrapolation, task negation); refused otherwise."""
    t: Optional[float] = Field(None, ge=0, le=1)
    """slerp / two-model liti: interpolation position, 0 = first input, 1 = second (default 0.5)."""
    eta: Optional[float] = Field(None, ge=0, le=1)
    """liti: step from the base towards the merged model (0 = base, 1 = merged); required for liti."""
    density: Optional[float] = Field(None, gt=0, le=1)
    """ties: fraction of each task vector kept (largest magnitudes); dare: keep probability. Required there."""
    ema_rate: Optional[float] = Field(None, gt=0, le=1)
    """ema: weight of each newer checkpoint, ema <- (1 - rate) ema + rate new (inputs oldest first)."""
    scale: float = 1.0
    """ties: lambda, the factor on the merged task vector."""
    seed: Optional[int] = None
    """dare: seed of the drop masks (default: the pipeline seed)."""
    dtype: Literal["keep", "float32", "bfloat16", "float16"] = "keep"
    """Output parameter dtype; keep = the reference model's (the base if used, else the first input)."""
    max_shard_size: ShardSize = "2GB"
    """Largest output shard (e.g. 500MB, 2GB); more than one shard adds model.safetensors.index.json."""
    allow_tokenizer_mismatch: bool = False
    """Merge models whose tokenizer.json vocabularies differ (the reference's tokenizer is kept)."""
    backend: Literal["streaming", "mergekit", "auto"] = "streaming"
    """streaming: ours, every method, one tensor per input in memory. mergekit: mergekit's run_merge
    (linear, slerp, task_arithmetic, ties). auto: mergekit where installed and equal to ours (to float32 rounding)."""


class Merge(Stage):
    name = "merge"
    Config = MergeConfig
    consumes = {"model": "model"}
    optional_inputs = {"model"}
    produces = {"model": "model"}

    @classmethod
    def inputs_read(cls, cfg) -> dict[str, str]:
        # without the latest model, it is neither read nor part of the fingerprint (its change re-runs nothing)
        return cls.consumes if cfg.use_latest_model else {}

    @staticmethod
    def labelled_inputs(name: str, cfg: MergeConfig, inputs: dict) -> list[tuple[str, str]]:
        """(config key, model) of each input, in merge order: the latest earlier model (unless use_latest_model
        is false), then `models`."""
        latest = inputs.get("model") if cfg.use_latest_model else None
        listed = [(f"{name}.models.{i}", model) for i, model in enumerate(cfg.models)]
        return ([(f"{name}.use_latest_model", latest)] if latest else []) + listed

    @classmethod
    def check_plan(cls, name: str, cfg, inputs: dict, artifacts: dict, kinds: dict) -> None:
        labelled = cls.labelled_inputs(name, cfg, inputs)
        if not labelled:
            raise ConfigError(f"{name}.models: no models to merge: list them (no earlier stage produces a model)")
        # counted as merge_models counts them: a checkpoint folder is its checkpoint-N dirs
        expanded = [(model, _model_dirs(key, model)) for key, model in labelled]
        _refuse_repeats(name, cfg, [d for _, dirs in expanded for d in dirs])
        if cfg.base is not None:
            _model_dirs(f"{name}.base", cfg.base, expand=False)  # merge_models takes the base as it is
        n_models = sum(len(dirs) for _, dirs in expanded)
        try:
            check_settings(
                cfg.method, n_models, cfg.base is not None, cfg.weights, cfg.t, cfg.eta, cfg.density,
                cfg.ema_rate, cfg.scale, cfg.normalize, cfg.allow_negative_weights, folders=folder_note(expanded),
            )  # fmt: skip
        except MergeError as err:
            raise ConfigError(f"{name} (method {cfg.method}, {n_models} input(s)): {err}") from None

    def setup(self) -> None:
        c = self.cfg
        # references (sft.model) were resolved to paths by the runner, which also ran check_plan
        self.inputs = [model for _, model in self.labelled_inputs(self.ctx.name, c, self.ctx.inputs)]
        self.base = c.base
        self.log.info(
            "[merge] %s of %s%s", c.method, ", ".join(self.inputs), f" with base {self.base}" if self.base else ""
        )

    def train(self) -> dict:
        c = self.cfg
        return merge_models(
            c.method,
            self.inputs,
            self.ctx.dir / "model",
            base=self.base,
            weights=c.weights,
            t=c.t,
            eta=c.eta,
            density=c.density,
            seed=self.ctx.seed if c.seed is None else c.seed,
            ema_rate=c.ema_rate,
            normalize=c.normalize,
            scale=c.scale,
            allow_negative_weights=c.allow_negative_weights,
            dtype=c.dtype,
            max_shard_size=c.max_shard_size,
            allow_tokenizer_mismatch=c.allow_tokenizer_mismatch,
            backend=c.backend,
        )


def _model_dirs(key: str, model: str, expand: bool = True) -> list[Path]:
    """The model dirs an input stands for (a checkpoint folder: its checkpoint-N dirs, oldest first), each
    with whole safetensors weights, so that a file cut short is refused before any stage runs. A reference to
    an output not made yet stands for one model: checked again, as a path, before the merge stage starts."""
    if is_reference(model):
        return [Path(model)]
    try:
        dirs = expand_checkpoints(model) if expand else [Path(model)]
        for d in dirs:
            whole_shards(d)
    except MergeError as err:
        raise ConfigError(f"{key}: {err}") from None
    return dirs


def _refuse_repeats(name: str, cfg: MergeConfig, dirs: list[Path]) -> None:
    """A model dir given twice (listed twice, or also inside a listed checkpoint folder) would count twice."""
    seen: set[str] = set()
    for d in dirs:
        key = str(d.resolve()) if d.exists() else str(d)
        if key in seen:
            latest = f" ({name}.use_latest_model puts the latest model first)" if cfg.use_latest_model else ""
            raise ConfigError(f"{name}.models: {d} is an input twice{latest}; a model listed twice would count twice")
        seen.add(key)


STAGE = Merge
