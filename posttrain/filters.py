"""Filters for conversational SFT rows: pure detectors built once and called per text.

Detectors are built from plain parameters (precompiled regexes, term sets); a cheap check ('@' present,
enough digits, a first-person phrase) runs before any costly regex, because most rows are clean.
posttrain/stages/filter/ applies them (and the dedup indexes of posttrain/dedup.py) to a JSONL stream.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import math
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .resources import UNSAFE_TERMS
from .chat import CONTROL_TOKENS
from .config import ConfigError

DEFAULT_TERMS_FILE = Path(UNSAFE_TERMS)
"""The shipped unsafe-term list (a source checkout or editable install has it)."""

# ----------------------------------------------------------------------------------- rows and text

_PUNCT = re.compile(r"[^\w\s]|_")


def normalise(text: str) -> str:
    """Comparison form for dedup: Unicode NFC (an accent typed as a combining mark equals the accented letter),
    lower case, punctuation removed, whitespace runs folded to one space."""
    if not text.isascii():  # ASCII is NFC already: most rows skip the normalisation
        text = unicodedata.normalize("NFC", text)
    return " ".join(_PUNCT.sub("", text.lower()).split())


def hash64(text: str) -> int:
    """A stable 64-bit hash of a string (Python's own hash() changes from one process to the next)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def structure_problem(
    row: dict,
    require_final_assistant: bool = True,
    drop_unfinished: bool = True,
    final_endings: Optional[Sequence[str]] = None,
    max_chars: Optional[int] = None,
    drop_control_tokens: bool = True,
) -> Optional[str]:
    """The first structural problem of a well-shaped row, as a short reason key, or None.

    'unfinished' covers rows the generator marked (`finished: false` or `truncated: true`); 'bad_ending', when
    `final_endings` is given, a final assistant turn that does not end with one of them.
    """
    msgs = row["messages"]
    if any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(msgs)):
        return "roles"
    if any(not m["content"].strip() for m in msgs):
        return "empty"
    if require_final_assistant and msgs[-1]["role"] != "assistant":
        return "no_final_assistant"
    if drop_unfinished and (row.get("finished") is False or row.get("truncated") is True):
        return "unfinished"
    if (
        final_endings
        and msgs[-1]["role"] == "assistant"
        and not msgs[-1]["content"].rstrip().endswith(tuple(final_endings))
    ):
        return "bad_ending"  # not `unfinished`: the report tells a generator's cut-offs from this setting's drops
    if drop_control_tokens and any(
        "<" in m["content"] and any(t in m["content"] for t in CONTROL_TOKENS) for m in msgs
    ):
        return "control_tokens"
    if max_chars is not None and sum(len(m["content"]) for m in msgs) > max_chars:
        return "overlong"
    return None


# Word pieces no tokenizer that splits text at spaces and between word characters and punctuation before
# merging (GPT-2-style byte-level BPE, Llama 3, the quickstart's own) can put into fewer tokens: a run of
# word characters (with its "n't"/"'s" tail), a run of punctuation. Letters and digits stay one piece:
# tokenizers part them, and a looser bound is a cheaper regex (this one runs on most rows of real data).
_PIECES = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
TURN_TOKENS = 3
"""Tokens every chat template spends on a turn at least: its start and end markers and the role name."""


def estimate_tokens(messages: Sequence[dict]) -> int:
    """A low estimate of a conversation's length in tokens when no tokenizer is at hand.

    Word pieces (`_PIECES`) plus TURN_TOKENS per turn plus one <bos>. It never exceeds the true count of a
    tokenizer that splits at spaces and punctuation first, so a length limit checked against it drops only
    rows that cannot fit. A SentencePiece vocabulary with tokens such as '.com' can count a little under it.
    """
    return 1 + sum(TURN_TOKENS + len(_PIECES.findall(m["content"])) for m in messages)


# ------------------------------------------------------------------------------ personal information

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "credit_card": "[CREDIT_CARD]",
    "id": "[ID]",
    "ip_address": "[IP_ADDRESS]",
    "phone": "[PHONE]",
}
"""PII type -> the placeholder redaction writes. Also the order types are matched in (cards before phones)."""

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][\w.%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}\b"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{3,39}(?![\w:])")
_PHONES = (  # international (+cc ...), North American (555) 123-4567 / 555-123-4567, national 0-prefixed
    (re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"), 8, 15),
    (re.compile(r"(?<![\w.+-])(?:\(\d{3}\)\s?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\w-]|\.\d)"), 10, 10),
    (re.compile(r"(?<![\w.+-])0\d{1,4}[ -]?\d{2,8}(?:[ -]\d{2,4}){0,3}(?![\w-]|\.\d)"), 9, 11),
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies (and ~90% of random numbers fail)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _is_card(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    issuer = digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720  # Amex/Visa/MC/Discover/JCB, MC 2-series
    return 13 <= len(digits) <= 19 and issuer and luhn_ok(digits)


def _is_ipv6(text: str) -> bool:
    """A valid IPv6 address with a decimal digit and 4+ hex digits: not a time (12:30:45) or C++ (a::b)."""
    hex_digits = len(text) - text.count(":")
    if hex_digits < 4 or not any(c.isdigit() for c in text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


class PIIDetector:
    """Finds and redacts personal information of the chosen types; `extra_id_patterns` count as [ID]."""

    def __init__(self, types: Iterable[str] = tuple(PLACEHOLDERS), extra_id_patterns: Iterable[str] = ()):
        types = set(types)
        unknown = types - set(PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; known: {list(PLACEHOLDERS)}")
        # (type, pattern, validator or None, prefilter: digits needed / '@' / ':' / '.')
        rules = [("email", _EMAIL, None, "@"), ("credit_card", _CARD, _is_card, 13), ("id", _SSN, None, 9)]
        rules += [("id", re.compile(p), None, 0) for p in extra_id_patterns]
        rules += [("ip_address", _IPV4, None, "."), ("ip_address", _IPV6, _is_ipv6, ":")]
        rules += [
            ("phone", rx, (lambda s, lo=lo, hi=hi: lo <= sum(c.isdigit() for c in s) <= hi), 7)
            for rx, lo, hi in _PHONES
        ]
        self.rules = [r for r in rules if r[0] in types]

    def redact(self, text: str) -> tuple[str, Counter]:
        """(text with each finding replaced by its placeholder, count of findings per type)."""
        found: Counter = Counter()  # empty for almost every text
        n_digits = sum(map(text.count, "0123456789"))
        for kind, pattern, check, needs in self.rules:
            if isinstance(needs, int) and n_digits < needs or isinstance(needs, str) and needs not in text:
                continue
            if needs == "." and (n_digits < 4 or text.count(".") < 3):
                continue

            def replace(m: re.Match, kind=kind, check=check) -> str:
                if check is not None and not check(m.group()):
                    return m.group()
                found[kind] += 1
                return PLACEHOLDERS[kind]

            text = pattern.sub(replace, text)
        return text, found


# ------------------------------------------------------------------------------------- unsafe terms

_WORDS = re.compile(r"\w+")


def read_terms(path: str | Path) -> list[str]:
    """One term per line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]


class TermMatcher:
    """Whole-word, case-insensitive term matching; a multi-word term matches the same words in a row.

    Text and terms are split into words the same way (so 'self-harm' also matches 'self harm'); one set
    intersection answers the single-word terms, which is what makes this cheap on clean text.
    """

    def __init__(self, terms: Iterable[str]):
        self.single: set[str] = set()
        self.multi: dict[str, list[tuple[str, ...]]] = {}
        for term in terms:
            words = _WORDS.findall(term.lower())
            if len(words) == 1:
                self.single.add(words[0])
            elif words:
                self.multi.setdefault(words[0], []).append(tuple(words[1:]))

    def find(self, text: str) -> Optional[str]:
        """The first listed term in `text`, or None."""
        words = _WORDS.findall(text.lower())
        hits = self.single.intersection(words)
        if hits:
            return min(hits)
        if self.multi and not self.multi.keys().isdisjoint(words):
            for i, w in enumerate(words):
                for rest in self.multi.get(w, ()):
                    if tuple(words[i + 1 : i + 1 + len(rest)]) == rest:
                        return " ".join((w, *rest))
        return None


# ------------------------------------------------------------------------------ self-identification

DEFAULT_OTHER_NAMES = [
    "ChatGPT",
    "GPT-3",
    "GPT-3.5",
    "GPT-4",
    "GPT-4o",
    "GPT",
    "OpenAI",
    "Claude",
    "Anthropic",
    "Gemini",
    "Bard",
    "Google",
    "DeepMind",
    "LLaMA",
    "Meta",
    "Mistral",
    "Mixtral",
    "Qwen",
    "Alibaba",
    "DeepSeek",
    "Copilot",
    "Microsoft",
    "Grok",
    "xAI",
    "Phi",
    "Cohere",
]
"""Other assistants and their makers: a response claiming to be one of them (or made by one) is wrong."""

_ANCHOR = re.compile(
    r"\b(?:I\s+am|I['’]m|I\s+was|I['’]ve|I\s+have|call\s+me|as\s+an?|"
    r"(?:my|our)\s+\w+(?:\s+\w+)?\s+(?:is|are|was|were|at))\b",
    re.I,
)  # cheap prefilter
_SELF = (
    r"(?:\bI\s+am|\bI['’]m|\bI\s+was|\bI['’]ve\s+been|\bI\s+have\s+been|\bmy\s+name\s+is|\bcall\s+me|"
    r"\bas\s+an?)"
)
# Up to 6 words between the self-reference and "made by"; a negation or a new clause ends the claim.
_GAP = r"(?:\s+(?!(?:not|never|no|nor|but|is|was|are|were|isn['’]t|wasn['’]t)\b)[^\s.!?;:]+){0,6}?"
_BY = r"(?:(?:that|which|who)\s+(?:was|is|has\s+been)\s+)?"
_MADE_BY = r"(?:made|created|developed|trained|built|designed|released|programmed)\s+by"
_BASED_ON = rf"(?:{_MADE_BY}|(?:owned|powered|fine-?tuned)\s+by|based\s+on|built\s+on|derived\s+from|a\s+version\s+of)"
_CLAIMED_NAME = r"(?P<claimed>[A-Z][\w-]*(?:\.\d+)*(?:\s+[A-Z0-9][\w-]*(?:\.\d+)*){0,2})"
_NAME_CLAIM = re.compile(
    r"(?:\bI\s+am|\bI['’]m|\b[Mm]y\s+name\s+is|\b[Cc]all\s+me|\bI\s+am\s+called|"
    rf"\bI['’]m\s+called)\s+{_CLAIMED_NAME}"
)  # case-sensitive: a name is capitalised
_MAKER_CLAIM = re.compile(rf"{_SELF}{_GAP}\s+{_BY}{_MADE_BY}\s+(?P<maker>[^.,;!?\n]+)", re.I)


def _squash(text: str) -> str:
    """Lower case letters and digits only: 'Posttrain Tiny' and 'posttrain-tiny' compare equal."""
    return re.sub(r"[\W_]", "", text.lower())


def _drop_the(text: str) -> str:
    return re.sub(r"^the\s+", "", text.strip(), flags=re.I)


class IdentityChecker:
    """Finds assistant text that claims another model's or company's identity, or contradicts the release.

    Only first-person claims count ('I am ChatGPT', "I'm a model made by OpenAI", 'As a Llama model',
    'my developers are at Google'); 'I am not ChatGPT' and 'ChatGPT is made by OpenAI' are not claims.
    With `release_name`, 'I am X' / 'my name is X' for a capitalised X not starting with the release name
    is a contradiction; with `release_maker`, so is 'I was trained by X' for a capitalised X.
    """

    def __init__(
        self,
        release_name: Optional[str] = None,
        release_maker: Optional[str] = None,
        other_names: Iterable[str] = DEFAULT_OTHER_NAMES,
        allowed_names: Iterable[str] = (),
    ):
        own = f"{release_name or ''} {release_maker or ''}".lower()
        names = sorted(
            {n for n in other_names if n.strip() and not re.search(rf"\b{re.escape(n.lower())}\b", own)},
            key=len,
            reverse=True,
        )  # a release named after a listed name (e.g. Gemma by Google) keeps it
        self.release_name, self.release_maker = release_name, release_maker
        self.allowed = {_squash(a) for a in allowed_names}
        self.claims = []
        if names:
            alt = rf"(?P<name>{'|'.join(map(re.escape, names))})(?![\w])"
            self.claims = [
                re.compile(rf"{_SELF}\s+(?:(?:a|an|the)\s+)?{alt}", re.I),
                re.compile(
                    rf"{_SELF}{_GAP}\s+{_BY}{_BASED_ON}\s+(?:the\s+)?"
                    rf"(?:(?:team|people|engineers|researchers)\s+at\s+)?{alt}",
                    re.I,
                ),
                re.compile(
                    r"\b(?:my|our)\s+(?:creators?|developers?|makers?|trainers?|parent\s+company)"
                    r"\s+(?:(?:is|are|was|were)(?:\s+at)?|at)\s+(?:the\s+)?(?:team\s+at\s+)?"
                    rf"{alt}",
                    re.I,
                ),
            ]

    def check(self, text: str) -> Optional[tuple[str, str]]:
        """(reason key, what was claimed) for the first identity problem in `text`, or None."""
        if not _ANCHOR.search(text):
            return None
        for rx in self.claims:
            m = rx.search(text)
            if m:
                return "other_identity", m.group(0)
        if self.release_name:
            for m in _NAME_CLAIM.finditer(text):
                claimed = _squash(m.group("claimed"))
                if not claimed.startswith(_squash(self.release_name)) and claimed not in self.allowed:
                    return "wrong_name", m.group(0)
        if self.release_maker:
            for m in _MAKER_CLAIM.finditer(text):
                maker = _drop_the(m.group("maker"))
                if maker[:1].isupper() and not _squash(maker).startswith(_squash(_drop_the(self.release_maker))):
                    return "wrong_maker", m.group(0)
        return None


# --------------------------------------------------------------------------------- classifier hook


class HookError(RuntimeError):
    """A classifier hook that raised, or returned something other than one number per text."""


def load_hook(spec: str, key: str) -> Callable:
    """Load `path/to/file.py:function` from the file path (not sys.path); errors name the config key."""
    path, sep, func = spec.rpartition(":")
    if not sep or not path or not func:
        raise ConfigError(f"{key}: expected 'path/to/file.py:function', got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: hook file not found: {file} (from {spec!r})")
    module_spec = importlib.util.spec_from_file_location(f"posttrain_hook_{hash64(str(file.resolve())):x}", file)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{key}: cannot import {file} as a python module")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ConfigError(f"{key}: importing {file} failed: {type(err).__name__}: {err}") from err
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {file} has no function {func!r}")
    return fn


def score_texts(hook: Callable, texts: list[str], key: str) -> list[float]:
    """Call the hook on a batch; insist on one finite number per text."""
    try:
        scores = hook(list(texts))
    except Exception as err:
        raise HookError(
            f"{key}: the classifier raised {type(err).__name__}: {err} (on a batch of {len(texts)} texts)"
        ) from err
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise HookError(
            f"{key}: the classifier must return one number per text (a list or 1-D array), got {type(scores).__name__}"
        ) from None
    if len(values) != len(texts):
        raise HookError(f"{key}: the classifier returned {len(values)} scores for {len(texts)} texts")
    if not all(math.isfinite(v) for v in values):
        raise HookError(f"{key}: the classifier returned a NaN or infinite score")
    return values
