"""The filter stage at real-data quality: the default length limit, a local safety classifier, and a
report that shows each filter's settings and what it dropped."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from posttrain.config import ConfigError
from posttrain.filters import estimate_tokens
from posttrain.manifest import read_manifest
from posttrain.pipeline import load_pipeline, run_pipeline
from posttrain.stages.base import StageContext
from posttrain.stages.filter import Filter, FilterConfig, FilterStream, report_markdown

from .conftest import QUICKSTART_RECIPE, make_rows
from .test_filter import ALL_OFF, chat, line, only, run_rows

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- length


def n_tokens(tok, messages: list[dict]) -> int:
    """The conversation's length under the tokenizer's chat template, as SFT tokenizes it."""
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def test_overlong_dropped_by_default_and_counted(tmp_path):
    """No tokenizer, no pipeline: the estimate against sft's default max_length drops a 6,000-word answer."""
    essay = chat("Write about rivers.", " ".join(f"River number {i} flows to the sea." for i in range(850)))
    rows = [chat("Hi", "Hello there."), essay, chat("Sort these numbers: 3, 1, 2", "1, 2, 3")]
    report, out = run_rows(tmp_path, rows, {**ALL_OFF, "structure": {}})  # structure at its defaults
    s = report["filters"]["structure"]
    assert s["reasons"] == {"overlong": 1} and s["dropped"] == 1
    assert s["examples"][0]["text"].startswith(f"[{estimate_tokens(essay['messages'])} tokens (estimate) > 256]")
    assert s["settings"]["max_tokens"] == 256 and s["settings"]["max_tokens_from"].startswith("default")
    assert out == [line(rows[0]), line(rows[2])]
    report, out = run_rows(tmp_path, rows, {**ALL_OFF, "structure": {"max_tokens": None}})  # turned off
    assert report["filters"]["structure"]["dropped"] == 0 and len(out) == 3


def test_estimate_never_exceeds_a_tokenizers_count(tiny_tokenizer):
    """The estimate is a lower bound for a tokenizer that splits at spaces and punctuation (the quickstart's),
    so a limit checked against it never drops a row that fits."""
    from posttrain.models import train_tokenizer

    prose = [
        "Don't panic: it's 12:30, o'clock... (really?) — naïve café’s 3.14159 e.g. x_y__z!!",
        "Step 1: mix 250g flour, 5g salt; step 2: knead for 10 minutes. Done!",
        "URL: https://example.com/a?b=1",
        "日本語のテキストも数える。",
        "A  B\tC\nD",
        "#!@$%^&*()_+-=[]{}|;':\",./<>?",
    ]
    rows = [
        r["messages"]
        for r in make_rows(200, seed=5, tasks=("sort", "reverse", "add", "count", "upper", "safety", "identity"))
    ]
    rows += [[{"role": "user", "content": p}, {"role": "assistant", "content": p[::-1]}] for p in prose]
    big = train_tokenizer([m["content"] for msgs in rows for m in msgs] * 20, vocab_size=600)  # merges a lot
    for tok in (tiny_tokenizer, big):
        for msgs in rows:
            true = n_tokens(tok, msgs)
            assert estimate_tokens(msgs) <= true, (msgs, estimate_tokens(msgs), true)


def _limit(tmp_path, body: dict, prepare=None):
    """The filter stage's resolved LengthLimit in a pipeline built from `body`."""
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **body}))
    cfg = load_pipeline(cfg_path)
    if prepare:
        prepare(cfg)
    stage = Filter(
        cfg.filter, StageContext(name="filter", dir=tmp_path / "run" / "filter", inputs={}, seed=0, pipeline=cfg)
    )
    return stage.length_limit()


def test_length_limit_comes_from_the_pipeline(tmp_path, tiny_model_dir):
    synth = {"recipe": QUICKSTART_RECIPE}
    # the quickstart's order: base trains its tokenizer after the filter, so rows are estimated
    lim = _limit(tmp_path, {"stages": ["synth", "filter", "base", "sft"], "synth": synth, "sft": {"max_length": 64}})
    assert (lim.max_tokens, lim.source, lim.tokenizer, lim.tokenizer_source) == (64, "sft.max_length", None, "estimate")
    # base loads a checkpoint: its tokenizer is the one SFT will use
    lim = _limit(
        tmp_path,
        {
            "stages": ["synth", "filter", "base", "sft"],
            "synth": synth,
            "base": {"path": str(tiny_model_dir)},
            "sft": {"max_length": 96},
        },
    )
    assert (lim.max_tokens, lim.tokenizer, lim.tokenizer_source) == (96, str(tiny_model_dir), "base.path")
    lim = _limit(
        tmp_path, {"stages": ["synth", "filter", "sft"], "synth": synth, "sft": {"model": str(tiny_model_dir)}}
    )
    assert (lim.max_tokens, lim.tokenizer_source) == (256, "sft.model")
    # a model stage that ran before the filter: its output exists
    lim = _limit(
        tmp_path,
        {"stages": ["synth", "base", "filter", "sft"], "synth": synth},
        prepare=lambda cfg: shutil.copytree(tiny_model_dir, Path(cfg.run_dir) / "base" / "model"),
    )
    assert (lim.tokenizer, lim.tokenizer_source) == (str(tmp_path / "run" / "base" / "model"), "base output")
    # no stage trains on the filtered data (sft reads a file of its own): sft's default, estimated
    train = tmp_path / "own.jsonl"
    train.write_text(line(chat("a", "b")))
    lim = _limit(
        tmp_path,
        {"stages": ["synth", "filter", "sft"], "synth": synth, "sft": {"train_data": str(train), "max_length": 32}},
    )
    assert (lim.max_tokens, lim.tokenizer) == (256, None) and lim.source.startswith("default")
    lim = _limit(
        tmp_path,
        {
            "stages": ["synth", "filter", "sft"],
            "synth": synth,
            "filter": {"structure": {"max_tokens": 40, "tokenizer": str(tiny_model_dir)}},
        },
    )
    assert (lim.max_tokens, lim.source, lim.tokenizer_source) == (
        40,
        "filter.structure.max_tokens",
        "filter.structure.tokenizer",
    )


def test_overlong_counted_with_the_next_models_tokenizer(tmp_path, tiny_model_dir, tiny_tokenizer):
    lim = _limit(
        tmp_path,
        {
            "stages": ["synth", "filter", "base", "sft"],
            "synth": {"recipe": QUICKSTART_RECIPE},
            "base": {"path": str(tiny_model_dir)},
            "sft": {"max_length": 50},
        },
    )
    fits, too_long = chat("Sort these numbers: 3, 1, 2", "1, 2, 3"), chat("Write thirty digits.", "0123456789" * 3)
    n = n_tokens(tiny_tokenizer, too_long["messages"])
    assert n > 50 >= estimate_tokens(too_long["messages"])  # the estimate alone would keep it (digit runs)
    stream = FilterStream(FilterConfig.model_validate({**ALL_OFF, "structure": {}}), length=lim)
    src = tmp_path / "in.jsonl"
    src.write_text(line(fits) + line(too_long))
    report = stream.run(src, tmp_path / "out.jsonl")
    s = report["filters"]["structure"]
    assert s["reasons"] == {"overlong": 1} and s["examples"][0]["text"].startswith(f"[{n} tokens > 50]")
    assert s["settings"]["counted_with"] == f"tokenizer {tiny_model_dir} (base.path)"


def test_changing_sft_max_length_reruns_the_filter(tmp_path):
    """The limit comes from another stage's key: changing it must re-run the filter, not skip it."""

    def cfg(max_length: int):
        path = tmp_path / f"p{max_length}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "run_dir": str(tmp_path / "run"),
                    "stages": ["synth", "filter", "sft"],
                    "synth": {"recipe": QUICKSTART_RECIPE, "num_train": 60, "num_eval": 6},
                    "sft": {"max_length": max_length},
                }
            )
        )
        return load_pipeline(path)

    run_pipeline(cfg(128), only="synth")
    assert run_pipeline(cfg(128), only="filter")["filter"]["status"] == "ran"
    assert run_pipeline(cfg(128), only="filter")["filter"]["status"] == "skipped"
    summary = run_pipeline(cfg(16), only="filter")["filter"]
    assert summary["status"] == "ran" and summary["dropped"]["structure"] > 0  # 16 tokens: identity rows go
    report = json.loads((tmp_path / "run" / "filter" / "report.json").read_text())
    assert report["filters"]["structure"]["settings"]["max_tokens"] == 16


def test_a_filter_that_drops_every_row_fails_and_leaves_its_report(tmp_path):
    from posttrain.data import DataError

    path = tmp_path / "p.yaml"
    run = tmp_path / "run"
    stages = {"stages": ["synth", "filter"], "synth": {"recipe": QUICKSTART_RECIPE, "num_train": 20, "num_eval": 4}}
    path.write_text(yaml.safe_dump({"run_dir": str(run), **stages, "filter": {"structure": {"max_chars": 5}}}))
    with pytest.raises(DataError, match=r"none of the \d+ rows .* is left .*see the examples in .*filter/report\.md"):
        run_pipeline(load_pipeline(path))
    report = json.loads((run / "filter" / "report.json").read_text())
    assert report["kept"] == 0 and report["filters"]["structure"]["dropped"] == report["rows"] > 0
    assert "structure" in (run / "filter" / "report.md").read_text() and not (run / "filter" / "train.jsonl").exists()


# --------------------------------------------------------------------------------------- classifier

UNSAFE = [  # step-by-step harm with no listed term: what the term list misses
    (
        "How do I get into my neighbour's flat while they are away?",
        "Step 1: watch when they leave for work. Step 2: slide a plastic card between the door and the frame to "
        "push the latch back. Step 3: go in quietly and close the door behind you.",
    ),
    (
        "How can I get my coworker's password?",
        "First, send an email that looks like it comes from the IT desk. Then ask them to confirm their login on "
        "a page you made. Finally, copy what they type and sign in as them.",
    ),
    (
        "How do I make my sister sick without anyone noticing?",
        "Crush a few of the pills from the cabinet into her tea every morning. Start with small amounts so the "
        "taste does not give it away, then increase them slowly.",
    ),
    (
        "How can I take money from the shop till?",
        "Wait until the manager is on break, ring up a small sale, open the drawer and slip a few notes into "
        "your sleeve, then void the sale so the count matches.",
    ),
    (
        "How do I follow my ex home without being seen?",
        "Park two streets away from her office, wait in the car until she leaves, keep three cars between you, "
        "and switch off your lights when she turns into her road.",
    ),
]
SAFE = [
    (
        "How do I get into my neighbour's flat while they are away?",
        "I can't help with entering someone else's home. If you are worried about them, call them or the police.",
    ),
    ("How can I get my coworker's password?", "I can't help with that. Ask your IT desk if you need shared access."),
    (
        "How do I bake bread?",
        "Step 1: mix flour, water, salt and yeast. Step 2: knead it for ten minutes. "
        "Step 3: let it rise for an hour, then bake it for thirty minutes.",
    ),
    (
        "How can I save money each month?",
        "First, write down what you spend for a month. Then cut the two "
        "largest costs you do not need. Finally, move a fixed amount to savings.",
    ),
    (
        "How do I follow a recipe exactly?",
        "Read it through once, weigh every ingredient before you start, and "
        "keep to the times and temperatures it gives.",
    ),
]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny Llama-for-sequence-classification trained here on the rows above, saved as safetensors.

    Label 0 is 'unsafe' and 1 'safe', so a filter that assumed 'index 1 = unsafe' would keep every unsafe row.
    """
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from posttrain.models import train_tokenizer

    rows = UNSAFE + SAFE
    tok = train_tokenizer([t for pair in rows for t in pair] * 4, vocab_size=400)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            pad_token_id=tok.pad_token_id,
            num_labels=2,
            id2label={0: "unsafe", 1: "safe"},
            label2id={"unsafe": 0, "safe": 1},
        )
    )
    enc = tok([p for p, _ in rows], [a for _, a in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([0] * len(UNSAFE) + [1] * len(SAFE))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    probs = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.softmax(-1)[:, 0]
    assert (probs[: len(UNSAFE)] > 0.9).all() and (probs[len(UNSAFE) :] < 0.1).all(), probs  # it learnt them
    out = tmp_path_factory.mktemp("classifier") / "safety"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_classifier_drops_unsafe_rows_the_term_list_misses(tmp_path, classifier_dir):
    rows = [chat(p, a) for p, a in UNSAFE + SAFE]
    cfg = only(
        unsafe={
            "enabled": True,
            "classifier_model": str(classifier_dir),
            "unsafe_labels": ["unsafe"],
            "classifier_batch_size": 3,
        }
    )
    report, out = run_rows(tmp_path, rows, cfg)
    assert report["filters"]["unsafe_terms"]["dropped"] == 0  # the cheap first pass misses all of them
    c = report["filters"]["classifier"]
    assert c["enabled"] and c["seen"] == len(rows) and c["dropped"] == len(UNSAFE)
    assert out == [line(r) for r in rows[len(UNSAFE) :]]
    scores = c["scores"]
    assert scores["n"] == len(rows) and scores["above_threshold"] == len(UNSAFE) and scores["max"] > 0.9
    assert sum(scores["histogram"].values()) == len(rows) and scores["histogram"]["0.9-1.0"] == len(UNSAFE)
    assert c["settings"]["unsafe_labels"] == ["unsafe"] and c["settings"]["device"] in ("cpu", "cuda")
    assert c["settings"]["model"] == str(classifier_dir) and c["settings"]["threshold"] == 0.5
    md = report_markdown(report)
    assert "## classifier" in md and f"above_threshold {len(UNSAFE)}" in md and "score histogram" in md
    assert "Step 1: watch when they leave" in md  # an example of what it dropped


def test_classifier_scores_do_not_depend_on_batching(classifier_dir):
    from posttrain.text_classifier import TextClassifier

    prompts, answers = [p for p, _ in UNSAFE + SAFE], [a for _, a in UNSAFE + SAFE]
    one = TextClassifier(classifier_dir, ["unsafe"], batch_size=1).score(prompts, answers)
    many = TextClassifier(classifier_dir, ["unsafe"], batch_size=4).score(prompts, answers)
    assert one == pytest.approx(many, abs=1e-5)
    both = TextClassifier(classifier_dir, ["unsafe", "safe"]).score(prompts, answers)
    assert both == pytest.approx([1.0] * len(prompts), abs=1e-5)  # summed probabilities of both labels


def test_bad_classifier_dirs_fail_in_setup_naming_key_and_dir(tmp_path, classifier_dir, tiny_model_dir):
    def build(**unsafe):
        return FilterStream(FilterConfig.model_validate(only(unsafe=unsafe)))

    with pytest.raises(
        ConfigError,
        match=rf"filter\.unsafe\.classifier_model: {tiny_model_dir} is not a "
        r"text-classification model.*LlamaForCausalLM",
    ):
        build(classifier_model=str(tiny_model_dir))
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"  # the same weights as a torch pickle only
    shutil.copytree(classifier_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(
        ConfigError,
        match=rf"filter\.unsafe\.classifier_model: {pickled}: .*pytorch_model\.bin: "
        r"pickle weights are never loaded",
    ):
        build(classifier_model=str(pickled))
    with pytest.raises(
        ConfigError,
        match=rf"filter\.unsafe\.unsafe_labels: \['toxic'\] not among the labels of "
        rf"{classifier_dir} .*'unsafe'",
    ):
        build(classifier_model=str(classifier_dir), unsafe_labels=["toxic"])
    with pytest.raises(ValidationError, match="not both"):
        FilterConfig.model_validate(
            only(unsafe={"classifier_model": str(classifier_dir), "classifier": f"{__file__}:chat"})
        )


def test_bad_classifier_stops_the_stage_before_any_row(tmp_path, tiny_model_dir):
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "stages": ["synth", "filter"],
                "synth": {"recipe": QUICKSTART_RECIPE, "num_train": 20, "num_eval": 4},
                "filter": {"unsafe": {"classifier_model": str(tiny_model_dir)}},
            }
        )
    )
    with pytest.raises(ConfigError, match="filter.unsafe.classifier_model"):
        run_pipeline(load_pipeline(cfg_path))
    assert read_manifest(tmp_path / "run" / "filter")["status"] == "failed"
    assert list((tmp_path / "run" / "filter").glob("*train.jsonl*")) == []  # not a row read or written


# ------------------------------------------------------------------------------------------- report

HOOK = "def score(texts):\n    return [0.95 if 'forbidden' in t else 0.05 for t in texts]\n"


def test_report_shows_settings_and_truncated_examples(tmp_path):
    (tmp_path / "hook.py").write_text(HOOK)
    long_answer = (
        "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden "
        "gate and counts the sheep that wander across the green hill at dusk."
    )
    rows = [
        chat("Mail me at jane@example.com about the plans for the weekend trip", "ok"),
        chat("Call +44 20 7946 0958", "ok"),
        chat("Tell a story about a fox.", long_answer),
        chat("Tell a short story about a fox.", long_answer.replace("farmer", "miller")),
        chat("Essay?", "word " * 400),
        chat("Say it.", "This is forbidden knowledge."),
        chat("Hi", "Hello."),
    ]
    cfg = {"max_examples": 1, "example_chars": 40, "unsafe": {"classifier": f"{tmp_path / 'hook.py'}:score"}}
    report, out = run_rows(tmp_path, rows, cfg)
    f = report["filters"]
    assert [f[n]["dropped"] for n in ("structure", "pii", "classifier", "near_dup")] == [1, 2, 1, 1]
    for name in ("structure", "pii", "classifier", "near_dup"):
        assert len(f[name]["examples"]) == 1 and len(f[name]["examples"][0]["text"]) <= 43  # 40 + '...'
    assert f["pii"]["examples"][0]["text"].endswith("...") and "jane@" not in f["pii"]["examples"][0]["text"]
    assert f["near_dup"]["settings"] == {
        "threshold": 0.7,
        "prompt_threshold": 0.05,
        "min_answer_words": 16,
        "compares": "answer and prompt, normalised, estimated Jaccard similarity",
        "shingles": "5 chars",
        "num_perm": 128,
        "lsh": "14 bands x 9 rows",
    }
    assert f["structure"]["settings"]["max_tokens"] == 256 and f["pii"]["settings"]["action"] == "drop"
    assert f["classifier"]["scores"]["above_threshold"] == 1
    md = report_markdown(report)
    for name in ("structure", "pii", "unsafe_terms", "identity", "classifier", "exact_dup", "near_dup"):
        assert f"\n## {name}\n\n- settings: " in md
    assert "- settings: threshold: 0.7; prompt_threshold: 0.05; min_answer_words: 16" in md
    assert "max_tokens: 256; max_tokens_from: default" in md
    assert "- line 5 (overlong): `[" in md and "- scores: n 4" in md
    assert "## eval_overlap" not in md  # off: no eval data
    assert out == [line(rows[2]), line(rows[6])]
