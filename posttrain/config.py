"""Typed configuration: pydantic sections loaded from YAML, with dotted command-line overrides.

Every field carries a one-line doc (the attribute docstring below it). Errors name the dotted key,
the YAML file and line where the key came from (or the override that set it), and what was expected.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .paths import check_file, check_model_dir, check_reward_model


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, every field has a doc."""

    # inf and nan are never meaningful settings (an infinite learning rate trains a NaN model)
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True, allow_inf_nan=False)


def _must_exist(value: Optional[str]) -> Optional[str]:
    if value is not None and not Path(value).exists():
        raise ValueError(f"path does not exist: {value!r} (relative paths are read from {os.getcwd()})")
    return value


InputPath = Annotated[Optional[str], AfterValidator(_must_exist)]
"""An optional path to something the user provides; it must exist when given."""


ARTIFACT_REF = re.compile(r"([A-Za-z_][\w-]*)\.([A-Za-z_]\w*)")
"""`NAME.ARTIFACT`: an artifact of an earlier stage instance of the same pipeline (e.g. sft.model)."""

_REFERENCE_VALIDATORS: set = set()


def reference_validator(fn):
    """Mark a field validator as one that lets a reference NAME.ARTIFACT through (for the runner to resolve):
    fields it validates are reference fields (`is_reference_field`). A registry, as the data layer's source
    paths are such fields and this module cannot import it."""
    _REFERENCE_VALIDATORS.add(fn)
    return fn


@reference_validator
def _model_dir(value: Optional[str]) -> Optional[str]:
    if value is not None and not is_reference(value):
        _must_exist(value)
        check_model_dir(value)
    return value


@reference_validator
def _reward_model_dir(value: Optional[str]) -> Optional[str]:
    if _model_dir(value) is not None and not is_reference(value):
        check_reward_model(value)
    return value


@reference_validator
def _path_or_reference(value: Optional[str]) -> Optional[str]:
    if value is None:
        return value
    path = Path(value)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        check_model_dir(path)  # a model or adapter: whole now (a checkpoint folder: checked where it is expanded)
        return value
    if path.exists() or ARTIFACT_REF.fullmatch(value):
        return value
    raise ValueError(
        f"{value!r} is neither an existing path nor an artifact reference like 'sft.model' "
        f"(relative paths are read from {os.getcwd()})"
    )


def _file(value: Optional[str]) -> Optional[str]:
    if value is not None:
        check_file(value)
    return value


def is_reference(value) -> bool:
    """`NAME.ARTIFACT` (e.g. sft.model): resolved by the runner (graph.resolve_references), not a path."""
    return isinstance(value, str) and bool(ARTIFACT_REF.fullmatch(value)) and not Path(value).exists()


ModelDir = Annotated[Optional[str], AfterValidator(_model_dir)]
"""An optional local model directory (config.json and whole safetensors weights) or a reference NAME.ARTIFACT."""
RewardModelDir = Annotated[Optional[str], AfterValidator(_reward_model_dir)]
"""A ModelDir that holds a trained reward head (`check_reward_model`)."""
ModelRef = Annotated[Optional[str], AfterValidator(_path_or_reference)]
"""An existing path of any kind (model, adapter or checkpoint folder) or a reference NAME.ARTIFACT."""


def _validators(annotation) -> Iterator:
    """Every validator function in a type annotation, nested Annotated, Optional, Union, list and dict included."""
    if typing.get_origin(annotation) is Annotated:
        for meta in typing.get_args(annotation)[1:]:
            yield getattr(meta, "func", None)
    for arg in typing.get_args(annotation):
        if not isinstance(arg, (str, int)):
            yield from _validators(arg)


def _field_validators(info) -> set:
    return {getattr(m, "func", None) for m in info.metadata} | set(_validators(info.annotation))


def is_reference_field(info) -> bool:
    """Whether a pydantic field (or the items of a list/dict field) is typed ModelDir, RewardModelDir, ModelRef
    or DataSource: its values may be references."""
    return bool(_field_validators(info) & _REFERENCE_VALIDATORS)


def is_path_field(info) -> bool:
    """Whether a pydantic field (or its items) names files or directories to read: typed InputPath, FilePath, or
    one of the reference types (which take paths too)."""
    return bool(_field_validators(info) & (_REFERENCE_VALIDATORS | {_must_exist, _file}))


FilePath = Annotated[Optional[str], AfterValidator(_file)]
"""An optional path that must be an existing file (a recipe, a verifier file)."""


def _shard_size(value: str) -> str:
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", value, re.I):
        raise ValueError(f"expected a size like 500MB or 2GB, got {value!r}")
    return value


ShardSize = Annotated[str, AfterValidator(_shard_size)]
"""A safetensors shard size: a number and a unit, like 500MB, 2GB or 1GiB."""

Precision = Literal["fp32", "bf16", "fp16"]
"""Compute precision: fp32, or bf16/fp16 mixed precision (fp32 master weights)."""
TrackingBackend = Literal["tensorboard", "wandb", "trackio", "mlflow"]
"""An experiment tracker (posttrain/tracking.py)."""


class DistributedConfig(Section):
    """How a training stage runs: in this process, or as N DeepSpeed processes (see launch.py)."""

    num_processes: int = Field(1, ge=1)
    """Processes (one per GPU; on CPU, gloo ranks). 1 runs in the calling process."""
    zero_stage: Literal[0, 2, 3] = 2
    """DeepSpeed ZeRO stage when num_processes > 1 (0 = plain data parallel)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    gather_16bit_weights_on_save: bool = True
    """ZeRO-3: gather shards into a normal model.safetensors when saving (every stage's save needs it)."""

    @model_validator(mode="after")
    def _settings_that_apply(self):
        """Refuse, before any work, what would be ignored or fail only when the stage saves."""
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (zero_stage is {self.zero_stage})")
        offloads = " and ".join(k for k in ("offload_optimizer", "offload_params") if getattr(self, k))
        if offloads and (self.num_processes == 1 or self.zero_stage == 0):
            raise ValueError(
                f"{offloads}: DeepSpeed ZeRO's, so they need num_processes > 1 and zero_stage 2 or 3 "
                f"(num_processes {self.num_processes}, zero_stage {self.zero_stage})"
            )
        if not self.gather_16bit_weights_on_save:
            raise ValueError(
                "gather_16bit_weights_on_save: false leaves ZeRO-3's shards unsaved, and every stage writes a whole "
                "model.safetensors; remove it"
            )
        return self


class ProcessesConfig(Section):
    """How a generating stage runs: in this process, or as N ranks sharing the prompts (vLLM engines
    colocated per rank, in tensor-parallel groups of sampling.tensor_parallel_size)."""

    num_processes: int = Field(1, ge=1)
    """Processes (one per GPU; on CPU, gloo ranks). 1 runs in the calling process."""


class LoraSection(Section):
    """Low-rank adaptation (peft)."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: int = Field(32, ge=1)
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt: 'all-linear' or a list of module names."""

    def peft_config(self, task_type: str):
        """The peft LoraConfig, or None when disabled. task_type SEQ_CLS also trains the `score` head in full."""
        if not self.enabled:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type=task_type,
        )


class TrainerSection(Section):
    """Hyperparameters shared by the stages that train with a (TRL) Trainer: sft, rm, distill."""

    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate (AdamW)."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = use epochs."""
    batch_size: int = Field(16, ge=1)
    """Sequences per device per step."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps."""
    warmup: float = Field(0.05, ge=0)
    """Warmup: a fraction of training if < 1, else a number of steps."""
    scheduler: str = "cosine"
    """Learning-rate schedule (transformers' lr_scheduler_type)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_length: int = Field(256, ge=8)
    """Longest tokenized example (conversation, or pair: prompt + longer answer); longer ones are left out, not cut."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, slower steps (~1.4x on tiny CPU models)."""
    logging_steps: int = Field(10, ge=1)
    """Log the training loss every N steps."""
    eval_steps: int = Field(50, ge=1)
    """Compute the held-out loss every N steps."""
    save_steps: int = Field(100, ge=1)
    """Checkpoint every N steps (the run resumes from the last one)."""
    keep_checkpoints: bool = False
    """Keep the resume checkpoints after the stage completes (off: delete them, keep model/)."""
    distributed: DistributedConfig = DistributedConfig()
    """Processes and DeepSpeed ZeRO settings."""
    precision: Optional[Precision] = None
    """fp32, bf16 or fp16 for this stage; None: the pipeline's `precision`."""
    report_to: Optional[list[TrackingBackend]] = None
    """Experiment trackers for this stage ([] = none); None: the pipeline's `report_to`."""

    @model_validator(mode="after")
    def _merged_lora_not_sharded(self):
        """LoRA saved merged into the weights (rm and dpo always; sft unless `lora.save` is adapter) needs
        whole weights, which ZeRO-3 shards."""
        lora, d = getattr(self, "lora", None), self.distributed
        if lora is None or not lora.enabled or d.num_processes == 1 or d.zero_stage != 3:
            return self
        choosable = hasattr(lora, "save")  # sft's LoRA may be saved as an adapter instead
        if getattr(lora, "save", "merged") == "merged":
            raise ValueError(
                f"{'lora.save=merged' if choosable else 'lora (saved merged)'} is not possible from ZeRO-3's "
                f"sharded weights; use zero_stage 2{' or lora.save=adapter' if choosable else ''}"
            )
        return self


# ----------------------------------------------------------------------------------------------
# YAML with line numbers


class DuplicateKey(Exception):
    """A mapping names a key twice (YAML loaders keep the last silently): (dotted key, line, first line)."""


def _line_map(node: yaml.Node, prefix: tuple = (), out: Optional[dict] = None) -> dict:
    """Map every key path in a composed YAML document to its 1-based line number; DuplicateKey where a
    mapping repeats a key."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            if path in out:
                raise DuplicateKey(".".join(str(p) for p in path), key_node.start_mark.line + 1, out[path])
            out[path] = key_node.start_mark.line + 1
            _line_map(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _line_map(item, prefix + (i,), out)
    return out


def read_yaml(path: str | Path) -> tuple[dict, dict]:
    """Read a YAML mapping; return (data, key-path -> line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data, node = {}, None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    try:
        return data, (_line_map(node) if node is not None else {})
    except DuplicateKey as dup:
        key, line, first = dup.args
        raise ConfigError(f"{path}:{line}: {key} is set twice (first on line {first}); keep one") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict[tuple, str]:
    """Apply `a.b.c=value` overrides in place (values parsed as YAML); return key-path -> origin."""
    origins = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. sft.learning_rate=3e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
        origins[tuple(parts)] = f"command-line override {item!r}"
    return origins


def _where(loc: tuple, lines: dict, origins: dict, source: str) -> str:
    """The most precise origin known for a key path: override, else YAML line of the longest prefix."""
    if loc not in lines and loc not in origins:
        # A key no YAML line holds that an override created on the way to a deeper one (`dpo.foo.bar=1` makes
        # `dpo.foo`): that override, not the line of the section it sits in.
        below = [origin for key, origin in origins.items() if key[: len(loc)] == loc]
        if below:
            return below[0]
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
        if loc[:n] in lines:
            return f"{source}:{lines[loc[:n]]}"
    return source


def format_validation_error(err: ValidationError, lines: dict, origins: dict, source: str) -> str:
    """Turn pydantic's error list into lines naming key, origin and expectation."""
    msgs = []
    for e in err.errors():
        # Labels in angle brackets name the member of a union that was tried (e.g. a data source's
        # "<mapping>"), not a key: leave them out so the key reads as the user wrote it.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("<") and p.endswith(">")))
        key = ".".join(str(p) for p in loc) or "<top level>"
        where = _where(loc, lines, origins, source)
        if e["type"] == "extra_forbidden":
            what = "unknown key"
        elif e["type"] == "missing":
            what = "required key is missing"
        else:
            got = e.get("input")
            what = f"{e['msg']} (got {got!r})" if not isinstance(got, dict) else e["msg"]
        msgs.append(f"  {key}: {what}  [{where}]")
    return "invalid configuration:\n" + "\n".join(msgs)


def load_config(model_cls, path: str | Path, overrides: list[str] = ()) -> Any:
    """Load `path` (YAML) into `model_cls` (or `model_cls(data)`, a callable choosing the class from the raw
    data), applying dotted overrides; raise ConfigError naming keys."""
    data, lines = read_yaml(path)
    data = copy.deepcopy(data)
    origins = apply_overrides(data, list(overrides))
    if not isinstance(model_cls, type):
        model_cls = model_cls(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, lines, origins, str(path))) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (defaults filled in), for the run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def undocumented_fields(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Fields (recursively) without a one-line doc; the test suite keeps this empty."""
    missing = []
    for name, field in model_cls.model_fields.items():
        if not (field.description or "").strip():
            missing.append(prefix + name)
        for sub in _nested_sections(field.annotation):
            missing += undocumented_fields(sub, prefix + name + ".")
    return missing


def _nested_sections(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [a for arg in getattr(annotation, "__args__", ()) or () for a in _nested_sections(arg)]
