"""The length limit the filter applies by default: what the stage that trains on its output will read.

A row longer than the training stage's `max_length` is cut there, answer first, so the model learns an
answer that stops mid-sentence with no end of turn; dropping it here, counted, is better. The limit and
the tokenizer come from the pipeline config (`StageContext.pipeline`): the first later stage that
consumes this stage's train data and has a `max_length` (sft, distill), and the tokenizer of the model it
loads, when that exists at filter time. In the quickstart the filter runs before `base` trains its
tokenizer, so there is none yet: rows are then measured with `filters.estimate_tokens`, a low estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ...config import ConfigError, TrainerSection
from ...filters import TURN_TOKENS, estimate_tokens
from .config import StructureConfig

DEFAULT_MAX_TOKENS = TrainerSection.model_fields["max_length"].default
"""The limit when the pipeline has no stage training on the filtered data: sft's default max_length."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
"""The files of a model directory that decide token counts (hashed into the stage's fingerprint)."""


@dataclass
class LengthLimit:
    """The token limit that applies, where it came from, and how rows are counted against it."""

    max_tokens: Optional[int]
    """Tokens a row may have (None: no limit)."""
    source: str
    """Which setting gave max_tokens, e.g. 'sft.max_length'."""
    tokenizer: Optional[str] = None
    """Tokenizer directory rows are counted with; None: `estimate_tokens`."""
    tokenizer_source: str = "estimate"
    """Which setting gave the tokenizer, e.g. 'base.path'; 'estimate' when there is none."""

    def settings(self) -> dict:
        """What the report shows."""
        if self.max_tokens is None:
            return {"max_tokens": None, "max_tokens_from": self.source}
        counted = (
            f"tokenizer {self.tokenizer} ({self.tokenizer_source})"
            if self.tokenizer
            else "estimate: word pieces + 3 per turn + 1, never above a space/punctuation-splitting "
            "tokenizer's count (no tokenizer exists at filter time)"
        )
        return {"max_tokens": self.max_tokens, "max_tokens_from": self.source, "counted_with": counted}

    def fingerprint(self) -> dict:
        """The derived settings a finished filter run depends on: a change must re-run the stage."""
        from ...manifest import hash_path

        files = [Path(self.tokenizer) / f for f in TOKENIZER_FILES] if self.tokenizer else []
        return {"max_tokens": self.max_tokens, "tokenizer": {f.name: hash_path(f) for f in files if f.is_file()}}


def _explicit_dir(value) -> Optional[str]:
    return str(value) if value and Path(str(value)).is_dir() else None


def _model_tokenizer(pipeline, names: list[str], consumer: int, filter_at: int) -> tuple[Optional[str], str]:
    """(tokenizer directory, its source) of the model stage `names[consumer]` loads, if it exists now."""
    from .. import stage_class

    kinds = dict(pipeline.instances())
    own = _explicit_dir(getattr(getattr(pipeline, names[consumer]), "model", None))
    if own:
        return own, f"{names[consumer]}.model"
    for i in range(consumer - 1, -1, -1):  # the latest earlier stage producing a model feeds it
        name = names[i]
        if "model" not in stage_class(kinds[name]).produces:
            continue
        section = getattr(pipeline, name)
        for key in ("path", "model"):  # a checkpoint it loads: its tokenizer is the one training uses
            found = _explicit_dir(getattr(section, key, None))
            if found:
                return found, f"{name}.{key}"
        if i < filter_at:  # ran before this stage: its output exists
            out = Path(pipeline.run_dir) / name / "model"
            return (str(out), f"{name} output") if out.is_dir() else (None, "estimate")
        if kinds[name] == "base":  # builds a model and trains its tokenizer after this stage
            return None, "estimate"
    return None, "estimate"


def resolve_length_limit(cfg: StructureConfig, pipeline=None, key: str = "filter") -> LengthLimit:
    """The LengthLimit for `cfg`, the section of instance `key` of `pipeline` (None: a stream used on its own)."""
    if not cfg.enabled or cfg.max_tokens is None:
        return LengthLimit(None, f"{key}.structure.max_tokens" if cfg.enabled else f"{key}.structure.enabled")
    names = [n for n, _ in pipeline.instances()] if pipeline is not None else []
    at = names.index(key) if key in names else -1
    consumer = _training_consumer(pipeline, names, at, key) if at >= 0 else None
    if cfg.max_tokens == "auto":
        if consumer is None:
            limit, source = DEFAULT_MAX_TOKENS, "default: sft's default max_length (no training stage reads this data)"
        else:
            limit, source = getattr(pipeline, names[consumer]).max_length, f"{names[consumer]}.max_length"
    else:
        limit, source = cfg.max_tokens, f"{key}.structure.max_tokens"
    if cfg.tokenizer:
        return LengthLimit(limit, source, str(cfg.tokenizer), f"{key}.structure.tokenizer")
    if consumer is None:
        return LengthLimit(limit, source)
    tok, tok_source = _model_tokenizer(pipeline, names, consumer, at)
    return LengthLimit(limit, source, tok, tok_source)


def _training_consumer(pipeline, names: list[str], at: int, name: str) -> Optional[int]:
    """Index of the first later stage that trains on this stage's train data and has a max_length."""
    from .. import stage_class

    kinds = dict(pipeline.instances())
    for i in range(at + 1, len(names)):
        stage_cls, section = stage_class(kinds[names[i]]), getattr(pipeline, names[i])
        if stage_cls.consumes.get("train_data") != "train_data" or not hasattr(section, "max_length"):
            continue
        own = getattr(section, "train_data", None)
        if own is None or str(own) == f"{name}.train_data":  # it reads our output, not a file of its own
            return i
    return None


def token_counter(limit: LengthLimit) -> Callable[[list[list[dict]]], list[Optional[int]]]:
    """A function from a batch of conversations (message lists) to their token counts under `limit`
    (None for a row the estimate need not count: it fits)."""
    if limit.tokenizer is None:

        def estimate(batch: list[list[dict]]) -> list[Optional[int]]:
            # word pieces never outnumber characters: a row with few enough characters fits uncounted,
            # which skips the regex for most rows of short-row data (it would cost ~25% of the stage)
            return [
                estimate_tokens(msgs)
                if sum(len(m["content"]) for m in msgs) + (TURN_TOKENS + 1) * len(msgs) > limit.max_tokens
                else None
                for msgs in batch
            ]

        return estimate
    from ...models import load_tokenizer

    try:
        tok = load_tokenizer(limit.tokenizer)
    except (OSError, ValueError) as err:  # transformers' own message names neither the setting nor the directory
        raise ConfigError(f"{limit.tokenizer_source}: cannot load a tokenizer from {limit.tokenizer}: {err}") from None

    def count(batch: list[list[dict]]) -> list[int]:
        if not batch:
            return []
        # the tokenizer's own chat template: what SFT renders (<bos> included in the text)
        texts = tok.apply_chat_template(batch, tokenize=False)
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    return count
