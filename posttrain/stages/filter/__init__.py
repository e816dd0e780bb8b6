"""filter: clean SFT data as the Gemma reports do: broken structure and over-length rows, personal
information, unsafe text (a term list, then a local classifier), wrong self-identification, duplicates,
and train rows whose prompt is in the eval split.

Filters run in this order, and a dropped row is counted by the first filter that drops it:
structure (with the length limit), pii, unsafe_terms, identity, classifier, eval_overlap, exact_dup,
near_dup. The length limit by default is what the stage training on the output reads (length.py).

Eval data is passed through untouched: this stage does not produce eval_data, so later stages keep
reading the synth split. It is read only to drop train rows whose normalised prompt is an eval prompt,
which keeps the two disjoint even when the train file came from elsewhere.

Output in run_dir/filter/: train.jsonl, report.json and report.md (per filter: rows seen, dropped,
changed, reasons, the settings that applied, examples; the classifier's score distribution).
"""

from __future__ import annotations

import json

from ...data import DataError
from ...manifest import atomic_write_json, atomic_write_text
from ..base import Stage
from .config import FILTERS, DedupConfig, FilterConfig, IdentityConfig, PIIConfig, StructureConfig, UnsafeConfig
from .length import LengthLimit, resolve_length_limit
from .report import report_markdown
from .stream import FilterStream


class Filter(Stage):
    name = "filter"
    Config = FilterConfig
    consumes = {"train_data": "train_data", "eval_data": "eval_data"}
    optional_inputs = {"eval_data"}
    produces = {"train_data": "train.jsonl"}

    @classmethod
    def sections_read(cls, name: str, pipeline) -> set[str]:
        limit = resolve_length_limit(getattr(pipeline, name).structure, pipeline, name)
        return {name} | {source.split(".")[0] for source in (limit.source, limit.tokenizer_source) if "." in source}

    def length_limit(self) -> LengthLimit:
        """The token limit from this pipeline (the training stage's max_length and tokenizer)."""
        return resolve_length_limit(self.cfg.structure, self.ctx.pipeline, self.ctx.name)

    def fingerprint_extra(self) -> dict:
        """The limit and tokenizer come from other stages' settings: changing them must re-run this stage."""
        return {"length": self.length_limit().fingerprint()}

    def setup(self) -> None:
        limit = self.length_limit()
        self.stream = FilterStream(
            self.cfg, self.ctx.inputs.get("eval_data"), key=self.ctx.name, length=limit, device=self.ctx.device
        )

    def train(self) -> dict:
        src, out = self.ctx.inputs["train_data"], self.ctx.dir / "train.jsonl"
        self.report = self.stream.run(src, out)
        r = self.report
        if r["kept"] == 0:  # an empty train.jsonl marked complete would only fail a later stage
            out.unlink(missing_ok=True)
            self.save()  # the report says what dropped them: the stage fails, but its report is there to read
            where = src if isinstance(src, str) else json.dumps(src)
            if r["rows"] == 0 and not r["malformed"]:
                raise DataError(f"{where}: no rows (the file is empty or holds only blank lines); nothing to filter")
            dropped = {n: f["dropped"] for n, f in r["filters"].items() if f["dropped"]}
            raise DataError(
                f"{self.ctx.name}: none of the {r['rows']} rows of {where} is left ({r['malformed']} "
                f"malformed; dropped: {json.dumps(dropped)}); see the examples in {self.ctx.dir / 'report.md'}, "
                f"and loosen the filter that drops them"
            )
        self.log.info(
            "[%s] %d rows: %d kept (%d changed), %d dropped, %d malformed",
            self.ctx.name,
            r["rows"],
            r["kept"],
            r["changed"],
            r["dropped"],
            r["malformed"],
        )
        return {
            "rows": r["rows"],
            "kept": r["kept"],
            "changed": r["changed"],
            "malformed": r["malformed"],
            "dropped": {name: f["dropped"] for name, f in r["filters"].items() if f["enabled"]},
        }

    def save(self) -> dict:
        atomic_write_json(self.ctx.dir / "report.json", self.report)
        atomic_write_text(self.ctx.dir / "report.md", report_markdown(self.report))
        return {}


STAGE = Filter

__all__ = [
    "FILTERS",
    "DedupConfig",
    "Filter",
    "FilterConfig",
    "FilterStream",
    "IdentityConfig",
    "LengthLimit",
    "PIIConfig",
    "STAGE",
    "StructureConfig",
    "UnsafeConfig",
    "report_markdown",
    "resolve_length_limit",
]
