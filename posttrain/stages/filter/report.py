"""What the filter stage reports: per filter, what it saw and dropped, the settings that applied, a few
examples of what it dropped (cut short), and the classifier's score distribution. Written as
report.json and, for people, report.md.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Optional

import numpy as np


class Tally:
    """What one filter saw, dropped and changed, with a few examples and the settings that applied."""

    def __init__(self, max_examples: int, example_chars: int):
        self.seen = self.dropped = self.changed = 0
        self.reasons: Counter = Counter()
        self.examples: list[dict] = []
        self.settings: dict = {}
        self.scores: Optional[ScoreStats] = None
        self._max, self._chars = max_examples, example_chars

    def note(self, line: int, reasons: str | list[str], text: str, dropped: bool = True) -> None:
        """Count one dropped (or changed) row under each of its reasons; keep it as an example if room."""
        reasons = [reasons] if isinstance(reasons, str) else reasons
        self.dropped += dropped
        self.changed += not dropped
        self.reasons.update(reasons)
        if len(self.examples) < self._max:
            cut = text if len(text) <= self._chars else text[: self._chars] + "..."
            self.examples.append({"line": line, "reason": "+".join(reasons), "text": cut})

    def as_dict(self) -> dict:
        out = {
            "seen": self.seen,
            "dropped": self.dropped,
            "changed": self.changed,
            "reasons": dict(self.reasons.most_common()),
            "settings": self.settings,
            "examples": self.examples,
        }
        if self.scores is not None:
            out["scores"] = self.scores.summary()
        return out


class ScoreStats:
    """Every classifier score of a run (4 bytes a row), summarised at the end: where the threshold sits
    in the distribution is what tells a user the classifier is too loose or too strict."""

    BINS = 10

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.values = array("f")

    def add(self, scores: list[float]) -> None:
        self.values.extend(scores)

    def summary(self) -> dict:
        v = np.frombuffer(self.values, dtype=np.float32) if len(self.values) else np.zeros(0, np.float32)
        if not len(v):
            return {"n": 0}
        q = np.quantile(v, [0.5, 0.9, 0.99])
        out = {
            "n": int(len(v)),
            "mean": float(v.mean()),
            "min": float(v.min()),
            "p50": float(q[0]),
            "p90": float(q[1]),
            "p99": float(q[2]),
            "max": float(v.max()),
            "above_threshold": int((v > self.threshold).sum()),
        }
        if v.min() >= 0 and v.max() <= 1:  # probabilities: a fixed histogram reads the same across runs
            counts, _ = np.histogram(v, bins=self.BINS, range=(0, 1))
            out["histogram"] = {f"{i / self.BINS:.1f}-{(i + 1) / self.BINS:.1f}": int(c) for i, c in enumerate(counts)}
        return out


def report_markdown(report: dict) -> str:
    """A human-readable report.md: totals and a table of filters, then per filter its settings, score
    distribution and examples of what it dropped."""
    out = [
        f"# Filter report: {report['input']}",
        "",
        f"{report['lines']} lines: {report['malformed']} malformed (skipped), {report['rows']} rows, "
        f"**{report['kept']} kept** ({report['changed']} changed), {report['dropped']} dropped.",
        "",
        "| filter | enabled | seen | dropped | changed | reasons |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in report["filters"].items():
        reasons = ", ".join(f"{r}: {n}" for r, n in list(f["reasons"].items())[:6])
        out.append(
            f"| {name} | {'yes' if f['enabled'] else 'no'} | {f['seen']} | {f['dropped']} | {f['changed']} "
            f"| {reasons} |"
        )
    if report["malformed_examples"]:
        out += ["", "## malformed", ""] + [_example(e) for e in report["malformed_examples"]]
    for name, f in report["filters"].items():
        if not f["enabled"]:
            continue
        out += ["", f"## {name}", ""]
        out += ["- settings: " + "; ".join(f"{k}: {_value(v)}" for k, v in f.get("settings", {}).items())]
        if f.get("scores"):
            s = f["scores"]
            line = ", ".join(
                f"{k} {_value(s[k])}"
                for k in ("n", "mean", "min", "p50", "p90", "p99", "max", "above_threshold")
                if k in s
            )
            out.append(f"- scores: {line}")
            if "histogram" in s:
                out.append("- score histogram: " + ", ".join(f"{b}: {c}" for b, c in s["histogram"].items()))
        if f["examples"]:
            out.append(f"- dropped{' or changed' if f['changed'] else ''}, first {len(f['examples'])}:")
            out += ["  " + _example(e) for e in f["examples"]]
        else:
            out.append("- nothing dropped")
    return "\n".join(out) + "\n"


def _example(e: dict) -> str:
    return f"- line {e['line']} ({e['reason']}): `{_one_line(e['text'])}`"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def _one_line(text: str) -> str:
    return text.replace("\n", " \u21b5 ").replace("`", "'")
