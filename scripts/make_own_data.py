"""Write a worked example of "your own data" into a directory, in the layouts such data really comes in.

    python scripts/make_own_data.py runs/own-data-inputs
    posttrain run configs/own-data-cpu.yaml

It writes:
- prompts.parquet: 200 prompt-only rows (`prompt`, `id`, `category`; no task or answer), 15 of them repeats
  of another prompt with other spacing, case or a final period (synth drops them as duplicates);
- preferences/data/{train_prefs,test_prefs}-00000-of-00001.parquet: preference pairs in the
  UltraFeedback-binarized layout (`prompt`, `prompt_id`, `chosen` and `rejected` as [user, assistant]
  message lists repeating the prompt, `messages`, `score_chosen`, `score_rejected`), split as that data set is;
- teacher/: a tiny Gemma 2 model with a tokenizer trained locally, fine-tuned briefly by posttrain's own
  base and sft stages on template answers to prompts like these, so its answers are well-formed sentences.

Everything is seeded: the same seed writes the same files. Each file is written to a temporary name and
renamed into place; the teacher's training run lives in DIR/.teacher-run while it trains and is removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

THINGS = {  # noun: (plural, colour, where, what it is)
    "cat": ("cats", "grey", "on a sofa", "a small animal that likes to sleep"),
    "dog": ("dogs", "brown", "in a park", "a loyal animal that likes to run"),
    "apple": ("apples", "red", "on a tree", "a sweet fruit"),
    "lemon": ("lemons", "yellow", "in a kitchen", "a sour fruit"),
    "boat": ("boats", "white", "on a lake", "a small ship for water"),
    "tree": ("trees", "green", "in a forest", "a tall plant with leaves"),
    "book": ("books", "blue", "in a library", "pages of words to read"),
    "cup": ("cups", "white", "in a cupboard", "a small bowl for drinks"),
    "star": ("stars", "bright", "in the night sky", "a hot ball of gas"),
    "frog": ("frogs", "green", "near a pond", "a small animal that jumps"),
    "lamp": ("lamps", "yellow", "on a desk", "a light for a room"),
    "shoe": ("shoes", "black", "by the door", "something to wear on a foot"),
    "cloud": ("clouds", "white", "in the sky", "a mass of tiny water drops"),
    "horse": ("horses", "brown", "on a farm", "a strong animal to ride"),
    "key": ("keys", "silver", "in a pocket", "a tool that opens a lock"),
    "bird": ("birds", "blue", "in a nest", "an animal with wings"),
    "carrot": ("carrots", "orange", "in a garden", "a root to eat"),
    "clock": ("clocks", "round", "on a wall", "a tool that shows the time"),
}
NAMES = [
    "Ada",
    "Ben",
    "Cleo",
    "Dan",
    "Eve",
    "Finn",
    "Gia",
    "Hugo",
    "Ivy",
    "Jon",
    "Kai",
    "Lena",
    "Max",
    "Nora",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
]
TEMPLATES = {  # category: ([phrasings], answer template)
    "describe": (
        ["Describe a {x} in one sentence.", "Tell me about the {x}.", "In one sentence, what is a {x}?"],
        "A {x} is {what}.",
    ),
    "colour": (
        ["What colour is a {x}?", "Which colour does a {x} have?", "Tell me the colour of a {x}."],
        "A {x} is usually {colour}.",
    ),
    "where": (
        ["Where can I find a {x}?", "Where does a {x} usually sit?", "Where would I see a {x}?"],
        "You can often find a {x} {where}.",
    ),
    "plural": (
        ["What is the plural of {x}?", "Give the plural of the word {x}.", "How do I say more than one {x}?"],
        "The plural of {x} is {plural}.",
    ),
    "greet": (
        ["Write a short greeting for {x}.", "Say hello to {x}.", "Greet my friend {x}."],
        "Hello {x}, it is good to see you.",
    ),
    "kind": (
        ["Say something kind about {x}.", "Write one nice sentence about {x}.", "Compliment {x} for me."],
        "{x} is a kind and thoughtful friend.",
    ),
}
NAME_CATEGORIES = ("greet", "kind")


def all_prompts() -> list[tuple[str, str, str]]:
    """Every (category, prompt, teacher-style answer) the templates make, in a fixed order."""
    out = []
    for category, (phrasings, answer) in TEMPLATES.items():
        subjects = NAMES if category in NAME_CATEGORIES else list(THINGS)
        for x in subjects:
            plural, colour, where, what = THINGS.get(x, ("", "", "", ""))
            fields = {"x": x, "plural": plural, "colour": colour, "where": where, "what": what}
            for p in phrasings:
                out.append((category, p.format(**fields), answer.format(**fields)))
    return out


def _variant(prompt: str, rng: random.Random) -> str:
    """The same prompt as people retype it: other case, doubled spaces, or a final period."""
    kind = rng.choice(["lower", "spaces", "period"])
    if kind == "lower":
        return prompt.lower()
    if kind == "spaces":
        return prompt.replace(" ", "  ", 2)
    return prompt + "." if not prompt.endswith(".") else prompt[:-1]


def _write_parquet(rows: list[dict], path: Path) -> Path:
    """Rows to a Parquet file, atomically (temp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_prompts(out: Path, n: int = 200, duplicates: int = 15, seed: int = 0) -> Path:
    """`n` prompt-only rows, `duplicates` of them retyped repeats of earlier ones, in a shuffled order."""
    rng = random.Random(f"prompts-{seed}")
    distinct = rng.sample(all_prompts(), n - duplicates)
    rows = [{"prompt": p, "category": c} for c, p, _ in distinct]
    rows += [{"prompt": _variant(r["prompt"], rng), "category": r["category"]} for r in rng.sample(rows, duplicates)]
    rng.shuffle(rows)
    return _write_parquet([{"id": f"p{i:04d}", **r} for i, r in enumerate(rows)], out / "prompts.parquet")


def _worse(answer: str, rng: random.Random) -> str:
    """A worse answer than `answer`: cut off, stuttering, evasive or sloppy (what annotators reject)."""
    words = answer.rstrip(".").split()
    kind = rng.choice(["cut", "stutter", "evasive", "sloppy"])
    if kind == "cut":
        return " ".join(words[: max(2, len(words) // 2)])
    if kind == "stutter":
        i = rng.randrange(len(words))
        return " ".join(words[: i + 1] + [words[i]] * 3 + words[i + 1 :]) + "."
    if kind == "evasive":
        return rng.choice(["I don't know.", "Maybe.", "Ask someone else."])
    return answer.lower().rstrip(".") + " " + rng.choice(["lol", "ok", "whatever"])


def write_preferences(out: Path, train: int = 400, test: int = 60, seed: int = 0) -> Path:
    """Pairs in the UltraFeedback-binarized layout, in its data/{split}-00000-of-00001.parquet files."""
    rng = random.Random(f"preferences-{seed}")
    pool = all_prompts()
    root = out / "preferences"
    for split, count in (("train_prefs", train), ("test_prefs", test)):
        rows = []
        for i in range(count):
            category, prompt, answer = rng.choice(pool)
            user = {"role": "user", "content": prompt}
            chosen = [user, {"role": "assistant", "content": answer}]
            rejected = [user, {"role": "assistant", "content": _worse(answer, rng)}]
            rows.append(
                {
                    "prompt": prompt,
                    "prompt_id": f"{split}-{i:04d}",
                    "chosen": chosen,
                    "rejected": rejected,
                    "messages": chosen,
                    "score_chosen": float(rng.choice([8, 9, 10])),
                    "score_rejected": float(rng.choice([2, 3, 4, 5])),
                }
            )
        _write_parquet(rows, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def train_teacher(out: Path, seed: int = 0, epochs: float = 12) -> Path:
    """A tiny Gemma 2 (posttrain.models, with a byte-level BPE tokenizer trained here on the template texts)
    fine-tuned on template answers by posttrain's own sft stage; written to out/teacher."""
    import yaml

    from posttrain.data import write_jsonl
    from posttrain.models import ModelConfig, build_tiny_model, save_model_dir, train_tokenizer
    from posttrain.pipeline import load_pipeline, run_pipeline

    work = out / ".teacher-run"
    shutil.rmtree(work, ignore_errors=True)
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for _, p, a in all_prompts()
    ]
    write_jsonl(work / "teacher_train.jsonl", rows)
    texts = ["user\nmodel\n"] + [m["content"] for r in rows for m in r["messages"]]
    tokenizer = train_tokenizer(texts, 400)
    arch = ModelConfig(
        family="gemma2",
        vocab_size=400,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        intermediate_size=192,
        sliding_window=64,
    )
    save_model_dir(build_tiny_model(arch, tokenizer, seed=seed), tokenizer, work / "init")
    config = {
        "run_dir": str(work / "run"),
        "seed": seed,
        "stages": ["sft"],
        "sft": {
            "model": str(work / "init"),
            "train_data": str(work / "teacher_train.jsonl"),
            "learning_rate": 3.0e-3,
            "epochs": epochs,
            "batch_size": 16,
            "max_length": 64,
            "eval_samples": 0,
            "gradient_checkpointing": False,
            "save_steps": 10_000,
            "logging_steps": 50,
        },
    }
    (work / "teacher.yaml").write_text(yaml.safe_dump(config))
    run_pipeline(load_pipeline(work / "teacher.yaml"))
    target, staging = out / "teacher", out / ".teacher.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(work / "run" / "sft" / "model", staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    shutil.rmtree(work)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write into (e.g. runs/own-data-inputs)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw and of the teacher's training")
    p.add_argument("--no-teacher", action="store_true", help="write the data files only")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "prompts": str(write_prompts(out, seed=args.seed)),
        "preferences": str(write_preferences(out, seed=args.seed)),
    }
    if not args.no_teacher:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        written["teacher"] = str(train_teacher(out, seed=args.seed))
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
