"""Precision and recall of the filter stage's duplicate detection on a labelled set of pairs.

Builds one JSONL stream of conversations whose duplicates are known, runs the filter stage's streaming
core on it (posttrain.stages.filter.FilterStream, only exact_dup and near_dup on) and scores what it drops:

  duplicates (row b repeats an earlier row a; dropping b is right):
    exact       a copy with case, spacing and punctuation changed
    few_words   prompt with 1-2 words changed, 30-120-word answer with 2 words changed
    paraphrase  the same answer under another question template (half of them naming the topic differently)
  distinct rows that share phrasing (dropping any is wrong):
    distinct        different questions about different topics (background)
    quickstart      the quickstart's template tasks (sort, reverse, add, count, upper, safety, identity)
    long_template   a 30-word instruction template around a short sentence, answered yes/no or with a number
    math_template   word problems from one template with different numbers, 30-word worked answers
    list            "List three facts about X": numbered lists of sentences
    canned          one 30-word canned answer (a refusal, a deferral) to unrelated questions

Text comes from the docstrings of the Python standard library (so the set is fixed for a Python version).
Precision = dropped duplicates / all dropped rows; recall = dropped duplicates / all duplicates. Also
printed: the previous default (whole-conversation MinHash at Jaccard 0.8, emulated with NearDupIndex) and
a sweep over the near-dup settings, from which the defaults were chosen.

    .venv/bin/python bench/dedup_quality.py            # 1-2.5 min on 2 shared cores
Writes bench/results/dedup_quality.json.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posttrain.dedup import HashIndex, NearDupIndex  # noqa: E402
from posttrain.filters import hash64, normalise  # noqa: E402
from posttrain.stages.filter import FilterConfig, FilterStream  # noqa: E402
from posttrain.tasks import TASKS, make_example  # noqa: E402

MODULES = (
    "os os.path json re collections itertools functools pathlib shutil subprocess textwrap string random "
    "statistics datetime calendar heapq bisect queue threading logging argparse csv zipfile tarfile gzip "
    "hashlib hmac secrets uuid urllib.parse http.client email.message socket select struct array copy pprint "
    "enum dataclasses typing abc contextlib inspect ast tokenize difflib unicodedata locale gettext decimal "
    "fractions math io tempfile glob fnmatch pickle shelve sqlite3 zlib base64 binascii codecs operator "
    "weakref types traceback warnings unittest doctest timeit sched asyncio concurrent.futures "
    "multiprocessing signal platform sysconfig configparser html html.parser xml.etree.ElementTree wave "
    "colorsys mimetypes ipaddress smtplib ftplib imaplib shlex cmd code dis pdb trace tracemalloc gc pkgutil "
    "runpy"
).split()
QUESTIONS = [
    "What does {x} do?",
    "Can you explain {x}?",
    "Explain {x} to me.",
    "How does {x} work?",
    "Tell me about {x}.",
    "What is {x} for?",
    "I'd like to understand {x}. What is it?",
    "Describe {x} briefly.",
    "Give me an overview of {x}.",
    "What is the purpose of {x} in Python?",
]
CANNED = [
    "I'm sorry, but I can't help with that request. If you have another question about Python or its "
    "standard library, I'd be glad to help you with it instead.",
    "That is a great question. The short answer is that it depends on your use case, so please share more "
    "details about what you are trying to build and I will suggest an approach.",
    "I don't have reliable information about that particular topic right now. Please check the official "
    "documentation for the most accurate and up to date details before relying on it.",
]
LONG_TEMPLATES = [
    (
        "Read the following sentence from the Python documentation carefully and decide whether it describes "
        "something that returns a value. Answer with yes or no only, without any explanation. Sentence: {s}",
        lambda s, rng: rng.choice(["yes", "no"]),
    ),
    (
        "Count the number of words in the following sentence taken from the Python documentation, and answer "
        "with a single number and nothing else. Sentence: {s}",
        lambda s, rng: str(len(s.split())),
    ),
]
NAMES, ITEMS = ["Tom", "Ana", "Lee", "Sam", "Mia", "Raj"], ["apples", "books", "coins", "pencils", "stickers"]
POSITIVE = ("exact", "few_words", "paraphrase")


def docstrings() -> list[tuple[str, str]]:
    """(dotted name, docstring folded to one line) for stdlib objects with 40+ words of documentation,
    minus any whose text nearly repeats an earlier one (os.path and posixpath share theirs)."""
    out, seen = [], NearDupIndex(threshold=0.5, prompt_threshold=0.0, min_answer_words=0)
    for m in MODULES:
        mod = importlib.import_module(m)
        objs = [(m, mod)] + [(f"{m}.{n}", getattr(mod, n, None)) for n in sorted(dir(mod)) if not n.startswith("_")]
        for name, obj in objs:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and (obj is mod or getattr(obj, "__module__", None) == mod.__name__):
                text = " ".join(doc.split())
                if len(text.split()) >= 40 and seen.add_batch([""], [normalise(text)], [len(out)])[0] is None:
                    out.append((name, text))
    return out


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]


def window(rng: random.Random, text: str, n: int) -> str:
    words = text.split()
    start = rng.randrange(max(1, len(words) - n + 1))
    return " ".join(words[start : start + n])


def change_words(rng: random.Random, text: str, n: int, vocab: list[str]) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), min(n, len(words))):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def restyle(rng: random.Random, text: str) -> str:
    """The same text after case, spacing and punctuation changes (an exact duplicate once normalised)."""
    text = text.upper() if rng.random() < 0.5 else text.lower()
    return "  ".join(text.replace(",", "").split(" ")) + "!"


def other_topic_name(x: str) -> str:
    """'threading.RLock' -> 'RLock from the threading module': the topic named differently."""
    module, _, obj = x.rpartition(".")
    return f"{obj} from the {module} module" if module else f"the {x} module"


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def build(seed: int = 0) -> tuple[list[dict], dict]:
    """The labelled stream: rows with `_id`, `_cat` and, for duplicates, `_of` (the id of the row repeated)."""
    rng = random.Random(seed)
    docs = docstrings()
    vocab = sorted({w for _, t in docs for w in t.split() if w.isalpha() and len(w) > 2})
    order = list(range(len(docs)))
    rng.shuffle(order)
    pairs_pool, list_pool = order[: len(order) * 2 // 3], order[len(order) * 2 // 3 :]  # no text shared across
    firsts, dups = [], []  # (category, row); dups: (category, row, index of its first in firsts)
    texts = set()

    def first(cat: str, row: dict) -> int:
        """Add a row unless it exactly repeats one already there (distinct rows must be distinct)."""
        key = "\n".join(normalise(m["content"]) for m in row["messages"])
        if key in texts:
            return -1
        texts.add(key)
        firsts.append((cat, row))
        return len(firsts) - 1

    for k, i in enumerate(pairs_pool):
        x, text = docs[i]
        answer = window(rng, text, rng.choice([30, 60, 60, 90, 120]))
        prompt = rng.choice(QUESTIONS).format(x=x)
        kind = ["exact", "few_words", "few_words", "paraphrase", "paraphrase", "distinct", "distinct"][k % 7]
        if kind == "distinct":
            first("distinct", chat(prompt, answer))
            continue
        a = first(f"{kind}_first", chat(prompt, answer))
        if a < 0:
            continue
        if kind == "exact":
            b = chat(restyle(rng, prompt), restyle(rng, answer))
        elif kind == "few_words":
            b = chat(change_words(rng, prompt, rng.choice([1, 2]), vocab), change_words(rng, answer, 2, vocab))
        else:
            topic = x if rng.random() < 0.5 else other_topic_name(x)
            template = rng.choice([q for q in QUESTIONS if q.format(x=x) != prompt])
            b = chat(template.format(x=topic), answer)
        dups.append((kind, b, a))
    for k in range(150):
        first("canned", chat(rng.choice(QUESTIONS).format(x=docs[rng.choice(order)][0]), CANNED[k % len(CANNED)]))
    for k in range(200):
        template, answer_of = LONG_TEMPLATES[k % len(LONG_TEMPLATES)]
        s = rng.choice(sentences(docs[rng.choice(order)][1]))
        first("long_template", chat(template.format(s=s), answer_of(s, rng)))
    for _ in range(200):
        first("math_template", chat(*word_problem(rng)))
    for i in list_pool:
        x, text = docs[i]
        facts = rng.sample(sentences(text), min(3, len(sentences(text))))
        first("list", chat(f"List three facts about {x}.", "\n".join(f"{n}. {s}" for n, s in enumerate(facts, 1))))
    seen = set()
    for k in itertools.count():  # unique quickstart rows, as synth writes them (no repeated prompt)
        row = make_example(list(TASKS)[k % len(TASKS)], rng, **({"max_value": 9} if k % len(TASKS) == 0 else {}))
        key = normalise(row["messages"][0]["content"])
        if key not in seen:
            seen.add(key)
            first("quickstart", chat(row["messages"][0]["content"], row["messages"][1]["content"]))
        if len(seen) >= 1500 or k > 100_000:
            break
    return interleave(rng, firsts, dups)


def word_problem(rng: random.Random) -> tuple[str, str]:
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(10, 60), rng.randint(5, 40), rng.randint(1, 9)
    question = f"{n} has {a} {it} and buys {b} more. Then {n} gives {c} of them to a friend. How many {it} now?"
    answer = (
        f"{n} starts with {a} {it}. After buying {b} more, {n} has {a} + {b} = {a + b} {it}. "
        f"Giving {c} to a friend leaves {a + b} - {c} = {a + b - c} {it}. The answer is {a + b - c}."
    )
    return question, answer


def interleave(rng: random.Random, firsts: list, dups: list) -> tuple[list[dict], dict]:
    """Shuffle the first rows; put each duplicate at a random later place than the row it repeats."""
    idx = list(range(len(firsts)))
    rng.shuffle(idx)
    pos = {j: p for p, j in enumerate(idx)}
    slots: dict[int, list] = {}
    for kind, row, a in dups:
        slots.setdefault(rng.randint(pos[a], len(idx) - 1), []).append((kind, row, a))
    rows, counts = [], {}
    for p, j in enumerate(idx):
        cat, row = firsts[j]
        rows.append({**row, "_id": f"f{j}", "_cat": cat.replace("_first", "") if cat.endswith("_first") else cat})
        for kind, drow, a in slots.get(p, []):
            rows.append({**drow, "_id": f"d{len(rows)}", "_cat": kind, "_of": f"f{a}"})
    for r in rows:
        counts[r["_cat"]] = counts.get(r["_cat"], 0) + ("_of" in r or r["_cat"] not in POSITIVE)
    return rows, counts


def score(rows: list[dict], dropped: set[int]) -> dict:
    """Precision, recall and per-category drop rates; `dropped`: 0-based indices of the dropped rows."""
    tp = sum(1 for i in dropped if "_of" in rows[i])
    fp = len(dropped) - tp
    pos = sum(1 for r in rows if "_of" in r)
    per = {}
    for i, r in enumerate(rows):  # duplicates by kind; distinct rows by category ("pair_first": a repeated row)
        c = per.setdefault(r["_cat"] if "_of" in r or r["_cat"] not in POSITIVE else "pair_first", [0, 0])
        c[0] += i in dropped
        c[1] += 1
    return {
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(pos, 1),
        "tp": tp,
        "fp": fp,
        "positives": pos,
        "dropped_share": {c: round(d / n, 3) for c, (d, n) in sorted(per.items())},
    }


def run_filter(rows: list[dict], path: Path, dedup: dict) -> set[int]:
    """Indices of the rows FilterStream drops with only the dedup filters on and `dedup` settings."""
    off = {
        "structure": {"enabled": False},
        "pii": {"enabled": False},
        "unsafe": {"enabled": False},
        "identity": {"enabled": False},
    }
    report = FilterStream(
        FilterConfig.model_validate({**off, "dedup": {"eval_overlap": False, **dedup}, "max_examples": 0})
    ).run(path, path.with_suffix(".out"))
    kept = {json.loads(line)["_id"] for line in path.with_suffix(".out").open()}
    assert report["kept"] == len(kept)
    return {i for i, r in enumerate(rows) if r["_id"] not in kept}


def previous_default(rows: list[dict]) -> set[int]:
    """The rule before this version: exact dedup, then whole-conversation MinHash at Jaccard 0.8."""
    exact, near, out = HashIndex(), NearDupIndex(threshold=0.8, prompt_threshold=0.0, min_answer_words=0), set()
    for i, r in enumerate(rows):
        text = "\n".join(normalise(m["content"]) for m in r["messages"])
        if (
            exact.first_seen([hash64(text)], [i])[0] is not None
            or near.add_batch([""], [text.replace("\n", " ")], [i])[0] is not None
        ):
            out.add(i)
    return out


SWEEP = {
    "threshold": [0.6, 0.65, 0.7, 0.75, 0.8, 0.9],
    "prompt_threshold": [0.0, 0.05, 0.1, 0.2, 0.3],
    "min_answer_words": [0, 8, 12, 16, 24],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dedup_quality.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows, counts = build(args.seed)
    print(f"{len(rows)} rows; duplicates and distinct rows per category: {counts}\n")
    with tempfile.TemporaryDirectory(prefix="dedup_quality_") as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = {
            "defaults": score(rows, run_filter(rows, path, {})),
            "previous default (whole conversation, 0.8)": score(rows, previous_default(rows)),
            "exact only": score(rows, run_filter(rows, path, {"near": False})),
        }
        sweep = []
        for values in itertools.product(*SWEEP.values()):
            setting = dict(zip(SWEEP, values))
            sweep.append({**setting, **score(rows, run_filter(rows, path, setting))})
    print_table(results)
    distinct = [c for c in results["defaults"]["dropped_share"] if c not in POSITIVE]
    print("\nsweep (exact dedup always on), best F1 first; fp = distinct rows dropped:")
    print(
        f"{'threshold':>9}{'prompt':>7}{'words':>6}{'P':>7}{'R':>7}{'F1':>7}{'fp':>5}  dropped share of distinct "
        f"categories ({', '.join(distinct)})"
    )
    for s in sorted(sweep, key=lambda s: -f1(s))[:15]:
        print(
            f"{s['threshold']:>9}{s['prompt_threshold']:>7}{s['min_answer_words']:>6}{s['precision']:>7.3f}"
            f"{s['recall']:>7.3f}{f1(s):>7.3f}{s['fp']:>5}  "
            + " ".join(f"{s['dropped_share'][c]:.2f}" for c in distinct)
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "counts": counts,
                "results": results,
                "sweep": sweep,
                "python": sys.version.split()[0],
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            indent=2,
        )
    )
    print(f"\n{time.perf_counter() - t0:.0f}s; wrote {out}")


def f1(s: dict) -> float:
    return 2 * s["precision"] * s["recall"] / max(s["precision"] + s["recall"], 1e-9)


def print_table(results: dict) -> None:
    cats = list(next(iter(results.values()))["dropped_share"])
    print(f"{'setting':<44}{'precision':>10}{'recall':>8}  " + "  ".join(cats))
    for name, r in results.items():
        print(
            f"{name:<44}{r['precision']:>10.3f}{r['recall']:>8.3f}  "
            + "  ".join(f"{r['dropped_share'][c]:>{len(c)}.2f}" for c in cats)
        )
    print("(per category: share of its duplicates dropped, or of its distinct rows dropped)")


if __name__ == "__main__":
    main()
