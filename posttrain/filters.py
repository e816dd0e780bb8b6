"""Filters for conversational SFT rows: pure detectors, and dedup indexes that keep only hashes.

Detectors are built once from plain parameters (precompiled regexes, term sets) and then called per
text; a cheap check ('@' present, enough digits, a first-person phrase) runs before any costly regex,
because most rows are clean. posttrain/stages/filter.py applies them to a JSONL stream and reports.

Dedup keeps no rows. Exact duplicates: a 64-bit hash of the normalised text. Near duplicates: MinHash
signatures (datasketch's default 'affine32' permutations, computed for a whole batch at once with numpy)
cut into LSH bands; band keys live in sorted numpy runs (~16 bytes each) and each kept row leaves one
byte per permutation, enough to check an LSH candidate's estimated Jaccard similarity against the
threshold (b-bit MinHash, Li & Koenig 2010) instead of trusting every band collision.
"""
from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import math
import re
import zlib
from array import array
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .chat import CONTROL_TOKENS
from .config import ConfigError

DEFAULT_TERMS_FILE = Path(__file__).resolve().parents[1] / "data" / "filters" / "unsafe_terms.txt"
"""The shipped unsafe-term list (a source checkout or editable install has it)."""

# ----------------------------------------------------------------------------------- rows and text

_PUNCT = re.compile(r"[^\w\s]|_")


def normalise(text: str) -> str:
    """Comparison form for dedup: lower case, punctuation removed, whitespace runs folded to one space."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def hash64(text: str) -> int:
    """A stable 64-bit hash of a string (Python's own hash() changes from one process to the next)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def shape_error(obj) -> Optional[str]:
    """Why `obj` cannot be read as a conversation at all (malformed), or None."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "missing or empty 'messages' list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i}: expected an object with string 'role' and 'content'"
    return None


def structure_problem(row: dict, require_final_assistant: bool = True, drop_unfinished: bool = True,
                      final_endings: Optional[Sequence[str]] = None, max_chars: Optional[int] = None,
                      drop_control_tokens: bool = True) -> Optional[str]:
    """The first structural problem of a well-shaped row, as a short reason key, or None.

    'unfinished' covers rows the generator marked (`finished: false` or `truncated: true`) and, when
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
    if final_endings and msgs[-1]["role"] == "assistant" \
            and not msgs[-1]["content"].rstrip().endswith(tuple(final_endings)):
        return "unfinished"
    if drop_control_tokens and any("<" in m["content"] and any(t in m["content"] for t in CONTROL_TOKENS)
                                   for m in msgs):
        return "control_tokens"
    if max_chars is not None and sum(len(m["content"]) for m in msgs) > max_chars:
        return "too_long"
    return None


# ------------------------------------------------------------------------------ personal information

PLACEHOLDERS = {"email": "[EMAIL]", "credit_card": "[CREDIT_CARD]", "id": "[ID]", "ip_address": "[IP_ADDRESS]",
                "phone": "[PHONE]"}
"""PII type -> the placeholder redaction writes. Also the order types are matched in (cards before phones)."""

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][\w.%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}\b")
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
        rules += [("phone", rx, (lambda s, lo=lo, hi=hi: lo <= sum(c.isdigit() for c in s) <= hi), 7)
                  for rx, lo, hi in _PHONES]
        self.rules = [r for r in rules if r[0] in types]

    def redact(self, text: str) -> tuple[str, Counter]:
        """(text with each finding replaced by its placeholder, count of findings per type)."""
        found: Counter = Counter()   # empty for almost every text
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
                    if tuple(words[i + 1:i + 1 + len(rest)]) == rest:
                        return " ".join((w, *rest))
        return None


# ------------------------------------------------------------------------------ self-identification

DEFAULT_OTHER_NAMES = ["ChatGPT", "GPT-3", "GPT-3.5", "GPT-4", "GPT-4o", "GPT", "OpenAI", "Claude", "Anthropic",
                       "Gemini", "Bard", "Google", "DeepMind", "LLaMA", "Meta", "Mistral", "Mixtral", "Qwen",
                       "Alibaba", "DeepSeek", "Copilot", "Microsoft", "Grok", "xAI", "Phi", "Cohere"]
"""Other assistants and their makers: a response claiming to be one of them (or made by one) is wrong."""

_ANCHOR = re.compile(r"\b(?:I\s+am|I['’]m|I\s+was|I['’]ve|I\s+have|call\s+me|as\s+an?|"
                     r"(?:my|our)\s+\w+(?:\s+\w+)?\s+(?:is|are|was|were|at))\b", re.I)  # cheap prefilter
_SELF = (r"(?:\bI\s+am|\bI['’]m|\bI\s+was|\bI['’]ve\s+been|\bI\s+have\s+been|\bmy\s+name\s+is|\bcall\s+me|"
         r"\bas\s+an?)")
# Up to 6 words between the self-reference and "made by"; a negation or a new clause ends the claim.
_GAP = r"(?:\s+(?!(?:not|never|no|nor|but|is|was|are|were|isn['’]t|wasn['’]t)\b)[^\s.!?;:]+){0,6}?"
_BY = r"(?:(?:that|which|who)\s+(?:was|is|has\s+been)\s+)?"
_MADE_BY = r"(?:made|created|developed|trained|built|designed|released|programmed)\s+by"
_BASED_ON = rf"(?:{_MADE_BY}|(?:owned|powered|fine-?tuned)\s+by|based\s+on|built\s+on|derived\s+from|a\s+version\s+of)"
_CLAIMED_NAME = r"(?P<claimed>[A-Z][\w-]*(?:\.\d+)*(?:\s+[A-Z0-9][\w-]*(?:\.\d+)*){0,2})"
_NAME_CLAIM = re.compile(r"(?:\bI\s+am|\bI['’]m|\b[Mm]y\s+name\s+is|\b[Cc]all\s+me|\bI\s+am\s+called|"
                         rf"\bI['’]m\s+called)\s+{_CLAIMED_NAME}")  # case-sensitive: a name is capitalised
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

    def __init__(self, release_name: Optional[str] = None, release_maker: Optional[str] = None,
                 other_names: Iterable[str] = DEFAULT_OTHER_NAMES, allowed_names: Iterable[str] = ()):
        own = f"{release_name or ''} {release_maker or ''}".lower()
        names = sorted({n for n in other_names if n.strip() and not re.search(rf"\b{re.escape(n.lower())}\b", own)},
                       key=len, reverse=True)  # a release named after a listed name (e.g. Gemma by Google) keeps it
        self.release_name, self.release_maker = release_name, release_maker
        self.allowed = {_squash(a) for a in allowed_names}
        self.claims = []
        if names:
            alt = rf"(?P<name>{'|'.join(map(re.escape, names))})(?![\w])"
            self.claims = [re.compile(rf"{_SELF}\s+(?:(?:a|an|the)\s+)?{alt}", re.I),
                           re.compile(rf"{_SELF}{_GAP}\s+{_BY}{_BASED_ON}\s+(?:the\s+)?"
                                      rf"(?:(?:team|people|engineers|researchers)\s+at\s+)?{alt}", re.I),
                           re.compile(r"\b(?:my|our)\s+(?:creators?|developers?|makers?|trainers?|parent\s+company)"
                                      r"\s+(?:(?:is|are|was|were)(?:\s+at)?|at)\s+(?:the\s+)?(?:team\s+at\s+)?"
                                      rf"{alt}", re.I)]

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
        raise HookError(f"{key}: the classifier raised {type(err).__name__}: {err} "
                        f"(on a batch of {len(texts)} texts)") from err
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise HookError(f"{key}: the classifier must return one number per text (a list or 1-D array), "
                        f"got {type(scores).__name__}") from None
    if len(values) != len(texts):
        raise HookError(f"{key}: the classifier returned {len(values)} scores for {len(texts)} texts")
    if not all(math.isfinite(v) for v in values):
        raise HookError(f"{key}: the classifier returned a NaN or infinite score")
    return values


# ------------------------------------------------------------------------------------ dedup indexes

class HashIndex:
    """uint64 key -> int64 value, in sorted numpy runs merged LSM-style (~16 bytes per key).

    Keys added since the last `flush()` sit in a dict, so rows of one batch see each other in order.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending: dict[int, int] = {}

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Value of each key in the flushed runs, -1 where absent (vectorised)."""
        order = np.argsort(keys)
        keys = keys[order]  # sorted queries: searchsorted walks the run in order (~4x fewer cache misses)
        found = np.full(len(keys), -1, dtype=np.int64)
        for run_keys, run_values in self.runs:
            pos = np.searchsorted(run_keys, keys).clip(max=len(run_keys) - 1)
            hit = run_keys[pos] == keys
            found[hit] = run_values[pos[hit]]
        out = np.empty_like(found)
        out[order] = found
        return out

    def first_seen(self, keys: Sequence[int], values: Sequence[int]) -> list[Optional[int]]:
        """For each key in order: the value stored by its first occurrence, or None (then store this one)."""
        found = self.lookup(np.array(keys, dtype=np.uint64)).tolist()
        out: list[Optional[int]] = []
        for key, old, value in zip(keys, found, values):
            if old < 0:
                old = self.pending.get(key, -1)
            if old < 0:
                self.pending[key] = value
            out.append(None if old < 0 else old)
        self.flush()
        return out

    def flush(self) -> None:
        if not self.pending:
            return
        keys = np.fromiter(self.pending.keys(), dtype=np.uint64, count=len(self.pending))
        values = np.fromiter(self.pending.values(), dtype=np.int64, count=len(self.pending))
        order = np.argsort(keys)
        self.runs.append((keys[order], values[order]))
        self.pending.clear()
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            newer, older = self.runs.pop(), self.runs.pop()
            self.runs.append(self._merge(*older, *newer))

    @staticmethod
    def _merge(k1: np.ndarray, v1: np.ndarray, k2: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merge two sorted runs in linear time, with no sort and one output-sized allocation."""
        at = np.searchsorted(k1, k2) + np.arange(len(k2))  # where each k2 lands in the merged run
        from_k1 = np.ones(len(k1) + len(k2), dtype=bool)
        from_k1[at] = False
        keys, values = np.empty(len(from_k1), dtype=np.uint64), np.empty(len(from_k1), dtype=np.int64)
        keys[at], values[at] = k2, v2
        keys[from_k1], values[from_k1] = k1, v1
        return keys, values

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs) + len(self.pending)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.runs)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (the pre-mix datasketch's affine32 scheme applies)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class NearDupIndex:
    """Streaming MinHash-LSH near-duplicate detection over normalised texts (keep the first of a group).

    Shingles are `shingle_size` consecutive characters (or words). Signatures equal datasketch's
    `MinHash(num_perm, seed)` fed the same shingle hashes; (bands, rows) are what datasketch's
    `MinHashLSH` picks for the threshold. A band collision is confirmed by the candidate's stored 1-byte
    signature: estimated Jaccard >= threshold.
    """

    CHUNK = 1 << 16
    SHINGLE_BUDGET = 1 << 15  # shingles per numpy block: the (num_perm x shingles) buffer is ~16 MB

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 5, unit: str = "chars",
                 seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm, self.k, self.unit = threshold, num_perm, shingle_size, unit
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.rows = lsh.b, lsh.r
        perm = MinHash(num_perm=num_perm, seed=seed).permutations  # affine32: odd a, any b, uint32
        self.perm_a, self.perm_b = perm[0].astype(np.uint32), perm[1].astype(np.uint32)
        rng = np.random.RandomState(seed)
        self.band_mult = rng.randint(0, 1 << 62, size=(self.bands, self.rows), dtype=np.uint64) * 4 + 1
        self.index = HashIndex()
        self._buffer: Optional[np.ndarray] = None
        self.chunks: list[np.ndarray] = []
        self.lines = array("q")

    def _tokens(self, text: str) -> np.ndarray:
        if self.unit == "chars":
            toks = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        else:
            toks = np.fromiter(map(zlib.crc32, text.encode().split()), dtype=np.uint32)
        return toks if len(toks) >= self.k else np.concatenate([toks, np.zeros(self.k - len(toks), np.uint32)])

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hash of every shingle of every text, uint32; index of each text's first shingle)."""
        toks = [self._tokens(t) for t in texts]
        lengths = np.array([len(t) for t in toks], dtype=np.int64)
        counts = lengths - self.k + 1
        firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        starts = np.arange(counts.sum()) - np.repeat(firsts, counts) + np.repeat(np.cumsum(lengths) - lengths, counts)
        mixed = fmix32(np.concatenate(toks))
        h = mixed[starts]
        for j in range(1, self.k):  # polynomial hash of the k mixed tokens, mod 2^32
            h = h * np.uint32(0x01000193) + mixed[starts + j]
        return h, firsts

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """MinHash signatures, (len(texts), num_perm) uint32, a block of <= SHINGLE_BUDGET shingles at a time."""
        h, firsts = self.shingle_hashes(texts)
        mixed, ends = fmix32(h), np.append(firsts[1:], len(h))
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        row = 0
        while row < len(texts):
            stop = max(row + 1, int(np.searchsorted(ends, firsts[row] + self.SHINGLE_BUDGET, side="right")))
            lo, hi = firsts[row], ends[stop - 1]
            out[row:stop] = self._min_permuted(mixed[lo:hi], firsts[row:stop] - lo)
            row = stop
        return out

    def _min_permuted(self, mixed: np.ndarray, firsts: np.ndarray) -> np.ndarray:
        """Per text, the minimum over its shingles of datasketch's affine32 step a * h + b (mod 2^32).

        Laid out (num_perm, shingles) in a reused buffer: reducing contiguous runs along the last axis
        is ~20x faster than (shingles, num_perm), and reusing memory avoids page faults.
        """
        if len(mixed) > self.SHINGLE_BUDGET:  # one very long text: minimum over slices of its shingles
            parts = [self._min_permuted(mixed[i:i + self.SHINGLE_BUDGET], np.zeros(1, np.int64))
                     for i in range(0, len(mixed), self.SHINGLE_BUDGET)]
            return np.min(parts, axis=0)
        if self._buffer is None:
            self._buffer = np.empty((self.num_perm, self.SHINGLE_BUDGET), dtype=np.uint32)
        buf = self._buffer[:, :len(mixed)]
        np.multiply(self.perm_a[:, None], mixed[None, :], out=buf)
        buf += self.perm_b[:, None]
        return np.minimum.reduceat(buf, firsts, axis=1).T

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """One 64-bit key per (row, band): a multiply-add hash with different multipliers per band."""
        bands = sigs[:, :self.bands * self.rows].reshape(len(sigs), self.bands, self.rows).astype(np.uint64)
        return (bands * self.band_mult[None]).sum(axis=2, dtype=np.uint64)

    @staticmethod
    def estimate_jaccard(small_a: np.ndarray, small_b: np.ndarray) -> float:
        """Jaccard estimate from two 1-byte-per-permutation signatures (chance agreement 1/256 removed)."""
        agree = np.count_nonzero(small_a == small_b) / len(small_a)
        return (agree - 1 / 256) / (1 - 1 / 256)

    def _similar(self, small: np.ndarray, slot: int) -> bool:
        stored = self.chunks[slot // self.CHUNK][slot % self.CHUNK]
        return self.estimate_jaccard(small, stored) >= self.threshold

    def _store(self, small: np.ndarray, line: int) -> int:
        slot = len(self.lines)
        if slot % self.CHUNK == 0:
            self.chunks.append(np.empty((self.CHUNK, self.num_perm), dtype=np.uint8))
        self.chunks[-1][slot % self.CHUNK] = small
        self.lines.append(line)
        return slot

    def add_batch(self, texts: Sequence[str], lines: Sequence[int]) -> list[Optional[int]]:
        """For each text in order: the line of an earlier near-duplicate, or None (then it is indexed)."""
        if not texts:
            return []
        sigs = self.signatures(texts)
        keys = self.band_keys(sigs)
        found = self.index.lookup(keys.ravel()).reshape(keys.shape).tolist()
        small = (sigs & np.uint32(0xFF)).astype(np.uint8)
        out = []
        for i, (row_keys, row_found) in enumerate(zip(keys.tolist(), found)):
            candidates = {v for v in row_found if v >= 0}
            candidates.update(self.index.pending[k] for k in row_keys if k in self.index.pending)
            dup = next((c for c in sorted(candidates) if self._similar(small[i], c)), None)
            if dup is None:
                slot = self._store(small[i], lines[i])
                for k in row_keys:
                    self.index.pending.setdefault(k, slot)
            out.append(None if dup is None else self.lines[dup])
        self.index.flush()
        return out

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + sum(c.nbytes for c in self.chunks) + self.lines.itemsize * len(self.lines)
