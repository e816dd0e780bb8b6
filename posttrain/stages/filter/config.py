"""The filter stage's config: one section per filter, each documented key by key (`posttrain show`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ...config import InputPath, Section
from ...data import DataSource
from ...filters import DEFAULT_OTHER_NAMES, PLACEHOLDERS

Role = Literal["user", "assistant"]
FILTERS = ["structure", "pii", "unsafe_terms", "identity", "classifier", "eval_overlap", "exact_dup", "near_dup"]
"""Filter names in the order they run (and in the report)."""


class StructureConfig(Section):
    """Rows that are not a complete, well-formed conversation, or that are longer than training reads."""

    enabled: bool = True
    """Drop rows with non-alternating roles, empty turns, a missing final answer, truncation, over-length."""
    require_final_assistant: bool = True
    """The last turn must be the assistant's."""
    drop_unfinished: bool = True
    """Drop rows whose metadata says the answer was cut off (`finished: false` or `truncated: true`)."""
    final_endings: Optional[list[str]] = None
    """If set, the final assistant turn must end with one of these strings (e.g. ['.', '!', '?'])."""
    drop_control_tokens: bool = True
    """Drop rows whose text contains chat control tokens (<start_of_turn>, <end_of_turn>, <eos>, ...)."""
    max_chars: Optional[int] = Field(None, ge=1)
    """Drop rows longer than this many characters (all turns; reason 'overlong'); None: no limit."""
    max_tokens: Union[Annotated[int, Field(ge=1)], Literal["auto"], None] = "auto"
    """Drop rows whose chat-rendered text is longer than this many tokens (reason 'overlong'). 'auto': the
    max_length of the stage that trains on the filtered data (sft or distill), or sft's default max_length
    when the pipeline has none; None: no token limit."""
    tokenizer: InputPath = None
    """Tokenizer directory for max_tokens. None: the tokenizer of the model the training stage loads when it
    exists at filter time (base.path, sft.model, or a model stage that ran before this one), otherwise an
    estimate that never exceeds the true count of a tokenizer splitting at spaces and punctuation."""


class PIIConfig(Section):
    """Personal information: emails, phones, card numbers (Luhn-checked), IP addresses, national IDs."""

    enabled: bool = True
    """Look for personal information."""
    action: Literal["drop", "redact"] = "drop"
    """Drop the row, or replace each finding with a typed placeholder ([EMAIL], [PHONE], ...)."""
    types: list[Literal["email", "phone", "credit_card", "ip_address", "id"]] = list(PLACEHOLDERS)
    """Which kinds to look for ('id': US SSN ddd-dd-dddd plus extra_id_patterns)."""
    extra_id_patterns: list[str] = []
    """More national-ID regexes (Python syntax), each finding counted and redacted as [ID]."""
    roles: list[Role] = ["user", "assistant"]
    """Turns to check."""

    @field_validator("extra_id_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"not a valid regex {p!r}: {err}") from None
        return patterns


class UnsafeConfig(Section):
    """Unsafe or toxic text: a term list (a cheap first pass), then an optional classifier."""

    enabled: bool = True
    """Drop rows containing a listed term (whole words, any case)."""
    terms_file: InputPath = None
    """Term list, one per line ('#' comments); None: the shipped list (posttrain/resources/unsafe_terms.txt)."""
    extra_terms: list[str] = []
    """Terms added to the file's."""
    roles: list[Role] = ["assistant"]
    """Turns the term list and a classifier hook check. Default assistant only: harmful *requests*
    answered by a refusal are wanted data."""
    classifier_model: InputPath = None
    """Local Hugging Face text-classification model directory (safetensors only, no remote code). It reads
    each row's prompt and answer together; rows whose unsafe score is above `threshold` are dropped."""
    unsafe_labels: list[str] = Field(["unsafe"], min_length=1)
    """Labels of classifier_model (its config's id2label) that mean unsafe; the score is their summed
    probability (the highest sigmoid for a multi-label model)."""
    classifier_batch_size: int = Field(32, ge=1)
    """Rows per classifier forward pass."""
    classifier_max_length: int = Field(512, ge=8)
    """Tokens classifier_model reads per row; a longer prompt and answer are cut, the longer one first."""
    classifier: Optional[str] = None
    """Alternative to classifier_model, a user scorer 'path/to/file.py:function': called with a list of
    texts (the `roles` turns of each row), returns one score each."""
    threshold: float = 0.5
    """Rows whose classifier score is above this are dropped."""

    @field_validator("classifier")
    @classmethod
    def _hook_spec(cls, spec: Optional[str]) -> Optional[str]:
        if spec is None:
            return spec
        path, sep, func = spec.rpartition(":")
        if not sep or not path or not func:
            raise ValueError(f"expected 'path/to/file.py:function', got {spec!r}")
        if not Path(path).is_file():
            raise ValueError(f"hook file not found: {path} (relative paths are read from {os.getcwd()})")
        return spec

    @model_validator(mode="after")
    def _one_classifier(self):
        if self.classifier and self.classifier_model:
            raise ValueError("set classifier_model (a model directory) or classifier (a hook), not both")
        return self


class IdentityConfig(Section):
    """Assistant turns claiming another model's or maker's identity, or contradicting the release's."""

    enabled: bool = True
    """Check assistant turns for wrong self-identification."""
    release_name: Optional[str] = None
    """The release's own name: 'I am X' with X not starting with it is dropped. None: not checked."""
    release_maker: Optional[str] = None
    """The release's maker: 'I was trained by X' (X capitalised) with another X is dropped."""
    other_names: list[str] = list(DEFAULT_OTHER_NAMES)
    """Other assistants and companies a response must not claim to be or be made by."""
    allowed_names: list[str] = ["OK", "Okay"]
    """Capitalised words after 'I am' that are not names."""


class DedupConfig(Section):
    """Exact and near duplicates of whole conversations, and train rows that repeat an eval prompt.

    Defaults measured on a labelled set of pairs (bench/dedup_quality.py, README "Filtering defaults").
    """

    exact: bool = True
    """Drop rows whose normalised conversation (case, whitespace, punctuation ignored) was seen before."""
    near: bool = True
    """Drop rows that nearly repeat an earlier kept row: answers at least `threshold` similar and prompts
    at least `prompt_threshold` similar (estimated Jaccard similarity of their shingle sets)."""
    eval_overlap: bool = True
    """Drop train rows whose normalised prompt is an eval prompt (needs eval data)."""
    threshold: float = Field(0.7, gt=0, lt=1)
    """Answer similarity from which two rows are near duplicates."""
    prompt_threshold: float = Field(0.05, ge=0, lt=1)
    """Prompt similarity two near duplicates need as well: one long canned answer (a refusal, an identity
    statement) given to unrelated prompts is not a duplicate."""
    min_answer_words: int = Field(16, ge=0)
    """Rows whose answer has fewer words are only checked for exact duplicates: short answers ('7', 'I can't
    help with that.') repeat by coincidence across different prompts."""
    num_perm: int = Field(128, ge=16, le=1024)
    """MinHash permutations (more: a sharper threshold, more time and memory)."""
    shingle_size: int = Field(5, ge=1)
    """Shingle length, in characters or words (shingle_unit)."""
    shingle_unit: Literal["chars", "words"] = "chars"
    """Shingles of characters (robust on short rows) or of words."""


class FilterConfig(Section):
    """Config of the filter stage."""

    train_data: DataSource = None
    """Conversations to filter (path, mapping or mixture); default: the latest data stage's train split."""
    eval_data: DataSource = None
    """Held-out conversations whose prompts train rows must not repeat; default: the data stage's eval split."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed rows (bad JSON, no messages list): stop naming file:line, or skip and count them; a mapping
    source that sets its own `on_error` keeps it."""
    batch_size: int = Field(1024, ge=1)
    """Rows judged together (token counts, classifier calls and MinHash are batched)."""
    max_examples: int = Field(5, ge=0)
    """Examples per filter kept in the report."""
    example_chars: int = Field(200, ge=10)
    """Example texts in the report are cut to this many characters."""
    structure: StructureConfig = StructureConfig()
    """Structure checks and the length limit."""
    pii: PIIConfig = PIIConfig()
    """Personal information."""
    unsafe: UnsafeConfig = UnsafeConfig()
    """Unsafe content."""
    identity: IdentityConfig = IdentityConfig()
    """Self-identification."""
    dedup: DedupConfig = DedupConfig()
    """Duplicates."""
