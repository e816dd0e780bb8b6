"""Dedup indexes that keep only hashes, never rows.

Exact duplicates: a 64-bit hash of the normalised text (`filters.hash64`). Near duplicates: MinHash
signatures of each row's answer and prompt (datasketch's default 'affine32' permutations, computed for a
whole batch at once with numpy); the answer's are cut into LSH bands, whose keys live in sorted numpy
runs (~16 bytes each), and each kept row leaves one byte per permutation, enough to check an LSH
candidate's estimated Jaccard similarity against the thresholds (b-bit MinHash, Li & Koenig 2010)
instead of trusting every band collision.
"""

from __future__ import annotations

import zlib
from array import array
from typing import NamedTuple, Optional, Sequence

import numpy as np


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


class NearMatch(NamedTuple):
    """An earlier kept row a new row nearly repeats, with the estimated similarities that matched."""

    line: int
    """Line of the earlier row in its file."""
    answer_similarity: float
    """Estimated Jaccard similarity of the two answers' shingle sets."""
    prompt_similarity: float
    """Estimated Jaccard similarity of the two prompts' shingle sets."""


class NearDupIndex:
    """Streaming MinHash-LSH near-duplicate detection of conversations (keep the first of a group).

    A row nearly repeats an earlier kept row when its answer does (estimated Jaccard similarity of the
    two answers' shingle sets >= `threshold`) and its prompt shares text with that row's prompt
    (>= `prompt_threshold`). The answer leads because it is where template rows differ: "Sort these
    numbers: 2, 5, 2" and "Sort these numbers: 8, 1, 3" share most of their text but not their answers,
    while a copy with a few words changed, or the same answer under a reworded prompt, repeats the
    answer. The low prompt floor keeps most rows where one long canned answer (a refusal, a deferral) is
    given to unrelated prompts. Answers shorter than `min_answer_words` words are not compared at all:
    short answers ("7", "I can't help with that.") repeat by coincidence, so such rows are left to exact
    dedup. The defaults are measured: bench/dedup_quality.py.

    Shingles are `shingle_size` consecutive characters (or words). Signatures equal datasketch's
    `MinHash(num_perm, seed)` fed the same shingle hashes. Candidates come from LSH bands of the answer
    signature, (bands, rows) as datasketch's `MinHashLSH` picks them for the threshold; each band key
    remembers the first row that had it. A candidate is confirmed with its stored 1-byte-per-permutation
    signatures (b-bit MinHash, Li & Koenig 2010) instead of trusting every band collision.
    """

    CHUNK = 1 << 16
    SHINGLE_BUDGET = 1 << 15  # shingles per numpy block: the (num_perm x shingles) buffer is ~16 MB

    def __init__(
        self,
        threshold: float = 0.7,
        prompt_threshold: float = 0.05,
        min_answer_words: int = 16,
        num_perm: int = 128,
        shingle_size: int = 5,
        unit: str = "chars",
        seed: int = 1,
    ):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.prompt_threshold, self.min_answer_words = threshold, prompt_threshold, min_answer_words
        self.num_perm, self.k, self.unit = num_perm, shingle_size, unit
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.rows = lsh.b, lsh.r
        perm = MinHash(num_perm=num_perm, seed=seed).permutations  # affine32: odd a, any b, uint32
        self.perm_a, self.perm_b = perm[0].astype(np.uint32), perm[1].astype(np.uint32)
        rng = np.random.RandomState(seed)
        self.band_mult = rng.randint(0, 1 << 62, size=(self.bands, self.rows), dtype=np.uint64) * 4 + 1
        self.index = HashIndex()
        self._buffer: Optional[np.ndarray] = None
        self.answer_chunks: list[np.ndarray] = []
        self.prompt_chunks: list[np.ndarray] = []
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
            parts = [
                self._min_permuted(mixed[i : i + self.SHINGLE_BUDGET], np.zeros(1, np.int64))
                for i in range(0, len(mixed), self.SHINGLE_BUDGET)
            ]
            return np.min(parts, axis=0)
        if self._buffer is None:
            self._buffer = np.empty((self.num_perm, self.SHINGLE_BUDGET), dtype=np.uint32)
        buf = self._buffer[:, : len(mixed)]
        np.multiply(self.perm_a[:, None], mixed[None, :], out=buf)
        buf += self.perm_b[:, None]
        return np.minimum.reduceat(buf, firsts, axis=1).T

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """One 64-bit key per (row, band): a multiply-add hash with different multipliers per band."""
        bands = sigs[:, : self.bands * self.rows].reshape(len(sigs), self.bands, self.rows).astype(np.uint64)
        return (bands * self.band_mult[None]).sum(axis=2, dtype=np.uint64)

    @staticmethod
    def estimate_jaccard(small_a: np.ndarray, small_b: np.ndarray) -> float:
        """Jaccard estimate from two 1-byte-per-permutation signatures (chance agreement 1/256 removed;
        never below 0, so a threshold of 0 accepts every pair)."""
        agree = np.count_nonzero(small_a == small_b) / len(small_a)
        return max(0.0, (agree - 1 / 256) / (1 - 1 / 256))

    def _match(self, answer: np.ndarray, prompt: np.ndarray, slot: int) -> Optional[NearMatch]:
        chunk, at = divmod(slot, self.CHUNK)
        a_sim = self.estimate_jaccard(answer, self.answer_chunks[chunk][at])
        if a_sim < self.threshold:
            return None
        p_sim = self.estimate_jaccard(prompt, self.prompt_chunks[chunk][at])
        return NearMatch(self.lines[slot], a_sim, p_sim) if p_sim >= self.prompt_threshold else None

    def _store(self, answer: np.ndarray, prompt: np.ndarray, line: int) -> int:
        slot = len(self.lines)
        if slot % self.CHUNK == 0:
            self.answer_chunks.append(np.empty((self.CHUNK, self.num_perm), dtype=np.uint8))
            self.prompt_chunks.append(np.empty((self.CHUNK, self.num_perm), dtype=np.uint8))
        self.answer_chunks[-1][slot % self.CHUNK] = answer
        self.prompt_chunks[-1][slot % self.CHUNK] = prompt
        self.lines.append(line)
        return slot

    def eligible(self, answer: str) -> bool:
        """Whether an answer (normalised text) is long enough to be compared."""
        return answer.count(" ") + 1 >= self.min_answer_words if answer else self.min_answer_words <= 0

    def add_batch(
        self, prompts: Sequence[str], answers: Sequence[str], lines: Sequence[int]
    ) -> list[Optional[NearMatch]]:
        """For each row in order (normalised prompt and answer texts): the earlier kept row it nearly
        repeats, or None (then it is indexed, if its answer is long enough to be compared)."""
        out: list[Optional[NearMatch]] = [None] * len(answers)
        todo = [i for i, a in enumerate(answers) if self.eligible(a)]
        if not todo:
            return out
        sigs = self.signatures([answers[i] for i in todo])
        keys = self.band_keys(sigs)
        found = self.index.lookup(keys.ravel()).reshape(keys.shape).tolist()
        small = (sigs & np.uint32(0xFF)).astype(np.uint8)
        small_prompt = (self.signatures([prompts[i] for i in todo]) & np.uint32(0xFF)).astype(np.uint8)
        pending = self.index.pending
        for j, (i, row_keys, row_found) in enumerate(zip(todo, keys.tolist(), found)):
            candidates = {v for v in row_found if v >= 0}
            candidates.update(pending[k] for k in row_keys if k in pending)
            match = next(filter(None, (self._match(small[j], small_prompt[j], c) for c in sorted(candidates))), None)
            if match is None:
                slot = self._store(small[j], small_prompt[j], lines[i])
                for k in row_keys:
                    pending.setdefault(k, slot)
            out[i] = match
        self.index.flush()
        return out

    @property
    def nbytes(self) -> int:
        chunks = sum(c.nbytes for c in self.answer_chunks) + sum(c.nbytes for c in self.prompt_chunks)
        return self.index.nbytes + chunks + self.lines.itemsize * len(self.lines)
