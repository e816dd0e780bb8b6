"""base: the model the pipeline starts from.

Either a local checkpoint directory (`base.path`: validated, used in place, never copied), or a tiny
model of a seed family built from config with a tokenizer trained on the run's own training data.
"""

from __future__ import annotations

from ..chat import check_gemma_format
from ..config import ConfigError, is_reference
from ..data import DataSource, iter_rows
from ..models import ModelConfig, build_tiny_model, count_parameters, load_model, load_tokenizer, save_model_dir
from ..models import check_model_dir, train_tokenizer
from .base import Stage


class BaseConfig(ModelConfig):
    """Config of the base stage."""

    train_data: DataSource = None
    """Text a built model's tokenizer learns from (any data source: conversations, prompts or pairs); default:
    the latest data stage's output. Not read when `path` is set."""


def _texts(source):
    """Text the tokenizer learns from: every message of the source's rows (either side of a pair), plus the
    role names."""
    yield "user\nmodel\n"
    for _, row in iter_rows(source, None, need_final_assistant=False):
        for key in ("messages", "chosen", "rejected"):
            for m in row.get(key, []):
                yield m["content"]


class BaseModel(Stage):
    name = "base"
    Config = BaseConfig
    consumes = {"train_data": "train_data"}
    optional_inputs = {"train_data"}
    input_hints = {"train_data": "or set base.path to a model directory (a built model trains its tokenizer on it)"}
    produces = {"model": "model"}

    @classmethod
    def check_plan(cls, name: str, cfg, inputs: dict, artifacts: dict, kinds: dict) -> None:
        if not cfg.path or is_reference(cfg.path):
            return
        try:  # before any stage: a model in another chat format would train, then fail at release
            check_gemma_format(load_tokenizer(cfg.path, cfg.trust_remote_code), cfg.path)
        except ValueError as err:
            raise ConfigError(f"{name}.path: {err}") from None

    @classmethod
    def optional_for(cls, cfg) -> set[str]:
        """A model loaded from `path` needs no data; one built from config trains its tokenizer on it."""
        return cls.optional_inputs if cfg.path else set()

    def artifacts(self) -> dict[str, str]:
        """An external checkpoint is used where it is; a built one lives in the stage dir."""
        if self.cfg.path:
            return {"model": str(self.cfg.path)}
        return {"model": str(self.ctx.dir / "model")}

    def setup(self) -> None:
        if self.cfg.path:
            check_model_dir(self.cfg.path)
            self.tokenizer = load_tokenizer(self.cfg.path, self.cfg.trust_remote_code)
            return
        data = self.ctx.inputs.get("train_data")
        if not data:
            raise ValueError(
                "base: building a tiny model needs training text for its tokenizer: set base.train_data, "
                "put a data stage (synth) before base, or set base.path to a model directory"
            )
        self.tokenizer = train_tokenizer(_texts(data), self.cfg.vocab_size)

    def train(self) -> dict:
        if self.cfg.path:
            # loaded to count and describe it only (nothing is written): CPU, in the checkpoint's dtype
            model = load_model(self.cfg.path, device="cpu", trust_remote_code=self.cfg.trust_remote_code)
            info = {"source": str(self.cfg.path)}
        else:
            model = build_tiny_model(self.cfg, self.tokenizer, seed=self.ctx.seed)
            info = {"source": f"tiny {self.cfg.family} built from config"}
        self.model = model
        info.update(
            parameters=count_parameters(model), vocab_size=len(self.tokenizer), architecture=type(model).__name__
        )
        self.log.info(
            "base model: %s, %s, %.2fM parameters", info["source"], info["architecture"], info["parameters"] / 1e6
        )
        return info

    def save(self) -> dict:
        if not self.cfg.path:
            save_model_dir(self.model, self.tokenizer, self.ctx.dir / "model")
        return {}


STAGE = BaseModel
