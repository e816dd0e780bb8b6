"""Users' data as it comes: what a trial with real-world files found, each read the way the data layer reads it
(system turns, role aliases, text parts, a byte-order mark, bad bytes, timestamps, numeric answers, HH prompts,
gzip, glob patterns), and rule rewards that share a name or return the wrong type."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.data import DataError, read_rows, write_jsonl
from posttrain.data.formats import RowError, to_canonical
from posttrain.scoring import RewardFunctionError, RuleSpec, Scorer, ScoringConfig, rule_keys
from posttrain.stages.filter import FilterConfig, FilterStream
from posttrain.stages.trainer_common import keep_fitting
from posttrain.tasks import answer_accuracy, normalise_answer

from .test_filter import ALL_OFF

torch.set_num_threads(1)


def _filter(tmp_path: Path, raw: bytes, on_error: str = "raise", structure: bool = False):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(raw)
    cfg = {**ALL_OFF, "on_error": on_error, "structure": {"enabled": structure, "max_tokens": None}}
    report = FilterStream(FilterConfig.model_validate(cfg)).run(src, dst)
    return report, [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]


def _line(row) -> bytes:
    return (json.dumps(row) + "\n").encode()


# ------------------------------------------------------------------------------ the filter's JSONL reader


def test_filter_reads_messages_as_the_data_layer_does(tmp_path):
    """System turns fold into the next user turn, ShareGPT role names and OpenAI text parts are read, a BOM is
    skipped; a row the reading changes is written as read, an unchanged one byte for byte."""
    plain = '{"messages": [{"role": "user", "content": "a?"},   {"role": "assistant", "content": "b."}]}\n'
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi?"},
                {"role": "assistant", "content": "Hi."},
            ]
        },  # noqa: E501
        {"messages": [{"role": "human", "content": "x?"}, {"role": "gpt", "content": "y."}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "p1"}, {"type": "text", "text": "p2"}]},
                {"role": "assistant", "content": "ok."},
            ]
        },  # noqa: E501
    ]
    report, out = _filter(tmp_path, b"\xef\xbb\xbf" + plain.encode() + b"".join(map(_line, rows)), structure=True)
    assert report["malformed"] == 0 and report["kept"] == 4, report
    assert out[1]["messages"][0] == {"role": "user", "content": "Be brief.\n\nhi?"}
    assert [m["role"] for m in out[2]["messages"]] == ["user", "assistant"]
    assert out[3]["messages"][0]["content"] == "p1\np2"
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()[0] == plain.rstrip("\n")


def test_filter_bad_bytes_and_unreadable_rows_name_their_line(tmp_path):
    good = _line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a."}]})
    bad = [b'{"messages": "caf\xe9"}\n', _line({"messages": [{"role": "robot", "content": "x"}]})]
    with pytest.raises(DataError, match=r"in\.jsonl:2: invalid UTF-8 \(byte 18 of the line: b'\\xe9'\)"):
        _filter(tmp_path, good + bad[0] + good)
    report, out = _filter(tmp_path, good + bad[0] + bad[1] + good, on_error="skip")
    assert report["malformed"] == 2 and report["kept"] == 2 and report["lines"] == 4
    assert [e["line"] for e in report["malformed_examples"]] == [2, 3]
    assert report["malformed_examples"][1]["reason"] == "unknown role"
    assert "unknown role 'robot'" in report["malformed_examples"][1]["text"]


def test_timestamps_are_written_as_iso_text(tmp_path):
    """A Parquet timestamp column reaches the filter's output (and any JSONL we write) as ISO 8601 text."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    when = dt.datetime(2024, 5, 1, 12, 30)
    msgs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a."}]]
    pq.write_table(pa.table({"messages": msgs, "created": [when]}), tmp_path / "d.parquet")
    cfg = FilterConfig.model_validate({**ALL_OFF, "structure": {"enabled": False}})
    FilterStream(cfg).run(str(tmp_path / "d.parquet"), tmp_path / "out.jsonl")
    assert json.loads((tmp_path / "out.jsonl").read_text())["created"] == "2024-05-01T12:30:00"
    write_jsonl(tmp_path / "w.jsonl", [{"day": dt.date(2024, 5, 2)}])
    assert json.loads((tmp_path / "w.jsonl").read_text()) == {"day": "2024-05-02"}


# -------------------------------------------------------------------------------------------- answers


def test_numeric_and_null_answers():
    assert normalise_answer(12) == normalise_answer(12.0) == normalise_answer(" 12. ") == "12"
    assert normalise_answer(0.5) == "0.5"
    with pytest.raises(ValueError, match="an answer is null"):
        normalise_answer(None)
    rows = [{"answer": 3, "task": "t"}, {"answer": None, "task": "t"}, {"answer": "x", "task": "t"}]
    assert answer_accuracy(rows, ["3", "anything", "y"]) == {"overall": 0.5, "n": 2, "t": 0.5}
    assert answer_accuracy([{"answer": None}], ["a"])["overall"] is None


# ---------------------------------------------------------------------------------- preference layouts


def test_rm_static_prompt_transcript_becomes_turns():
    row = {
        "prompt": "\n\nHuman: 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:",
        "chosen": " 6.",
        "rejected": " 7.",
    }
    pair = to_canonical(row, "preference", "preference")
    assert pair["chosen"] == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]
    assert pair["rejected"][-1] == {"role": "assistant", "content": "7."}
    prompt = to_canonical({"prompt": "Human: hi\n\nAssistant:"}, "prompt", "prompt")
    assert prompt["messages"] == [{"role": "user", "content": "hi"}]
    # a prompt that merely starts with "Human:" is text
    assert to_canonical({"prompt": "Human: hi"}, "prompt", "prompt")["messages"][0]["content"] == "Human: hi"


def test_pair_lists_with_a_system_turn_and_mismatched_prompts():
    system = {"role": "system", "content": "Be kind."}
    user, a, b = (
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A"},
        {"role": "assistant", "content": "B"},
    )  # noqa: E501
    pair = to_canonical({"prompt": "Q?", "chosen": [system, user, a], "rejected": [system, user, b]}, "preference")
    assert pair["chosen"] == [{"role": "user", "content": "Be kind.\n\nQ?"}, a]
    other = {"role": "user", "content": "Other?"}
    with pytest.raises(RowError, match="'chosen' is a whole conversation but its prompt turns differ"):
        to_canonical({"prompt": "Q?", "chosen": [other, a], "rejected": [b]}, "preference")
    with pytest.raises(RowError, match="a system turn with no user turn after it"):
        to_canonical({"prompt": "Q?", "chosen": [{"role": "system", "content": "S"}], "rejected": "no"}, "preference")
    with pytest.raises(RowError, match="give the same answer"):
        to_canonical({"prompt": "Q?", "chosen": "A", "rejected": " A "}, "preference")


# ------------------------------------------------------------------------------------- files and paths


def test_gzip_json_lines_glob_patterns_and_a_pretty_printed_object(tmp_path):
    rows = [
        {"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
        for i in range(3)
    ]  # noqa: E501
    for part in ("a", "b"):
        with gzip.open(tmp_path / f"train-{part}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    assert len(read_rows(str(tmp_path / "train-a.jsonl.gz"), "preference")) == 3
    assert len(read_rows(str(tmp_path / "train-*.jsonl.gz"), "preference", seed=1)) == 6
    with pytest.raises(DataError, match=r"the pattern .*nope-\*\.jsonl' matches no file"):
        read_rows(str(tmp_path / "nope-*.jsonl"))
    (tmp_path / "obj.json").write_text('{"data": [\n  {"messages": []}\n]}\n')
    with pytest.raises(DataError, match=r"obj\.json:1: .*one JSON object over several lines"):
        read_rows(str(tmp_path / "obj.json"))


def test_a_shuffled_read_of_a_gzip_file_never_seeks_back_in_the_stream(tmp_path, monkeypatch):
    """A seek back in a gzip stream decompresses from the start: reads by index go to a decompressed copy."""
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(50)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

    def no_seek(*args, **kwargs):
        raise AssertionError("seek in a gzip stream")

    monkeypatch.setattr(gzip.GzipFile, "seek", no_seek)
    shuffled = read_rows({"path": str(tmp_path / "p.jsonl.gz"), "seed": 3}, "preference")
    assert shuffled == read_rows({"path": str(tmp_path / "p.jsonl"), "seed": 3}, "preference")
    assert shuffled != read_rows(str(tmp_path / "p.jsonl"), "preference")  # it was shuffled


def test_keep_fitting_counts_and_refuses_when_nothing_fits():
    assert keep_fitting(["a", "bb", "c"], [3, 9, 5], 5, "sft", "training conversations") == (["a", "c"], 1)
    assert keep_fitting([], [], 5, "sft", "held-out conversations") == ([], 0)
    assert keep_fitting(["x"], [9], 5, "sft", "held-out conversations") == ([], 1)  # held-out: none is no error
    with pytest.raises(ValueError, match=r"sft.max_length=5: none of the 2 training pairs fits \(the shortest has 7"):
        keep_fitting(["x", "y"], [9, 7], 5, "sft", "training pairs")


# ---------------------------------------------------------------------------------------- rule rewards


def _rule_file(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


def test_rules_sharing_a_function_name_keep_their_own_scores(tmp_path):
    """Two files' `score` functions: each part is kept under its own name, and the NaN of the first is caught
    and blamed on its file (it used to be overwritten by the second's finite scores)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    nan = _rule_file(
        tmp_path / "a" / "len.py",
        "def score(prompts, completions, **_):\n    return [float('nan')] * len(completions)\n",
    )  # noqa: E501
    one = _rule_file(
        tmp_path / "b" / "ok.py", "def score(prompts, completions, **_):\n    return [1.0] * len(completions)\n"
    )  # noqa: E501
    two = _rule_file(
        tmp_path / "b" / "len.py", "def score(prompts, completions, **_):\n    return [2.0] * len(completions)\n"
    )  # noqa: E501
    specs = [RuleSpec(path=one, function="score"), RuleSpec(path=two, function="score", weight=0.5)]
    assert rule_keys(specs) == ["ok.score", "len.score"]
    scores = Scorer(ScoringConfig(rules=specs)).score([[{"role": "user", "content": "q"}]], ["a"])
    assert {k: v.tolist() for k, v in scores.parts.items()} == {"ok.score": [1.0], "len.score": [2.0]}
    assert scores.total.tolist() == [2.0]
    specs = [RuleSpec(path=nan, function="score"), RuleSpec(path=two, function="score")]
    assert rule_keys(specs) == ["score#0", "score#1"]
    with pytest.raises(FloatingPointError, match=r"a/len\.py:score gave a non-finite reward \(nan\)"):
        Scorer(ScoringConfig(rules=specs)).score([[{"role": "user", "content": "q"}]], ["a"])


@pytest.mark.parametrize(
    "returned, got",
    [
        ("{'a': 1.0}", "got dict"),
        ("['1.0']", "got str '1.0' at position 0"),
        ("[True]", "got bool True at position 0"),
        ("'1'", "got str"),
    ],
)
def test_rule_returning_other_than_numbers_is_refused(tmp_path, returned, got):
    path = _rule_file(tmp_path / "r.py", f"def r(prompts, completions, **_):\n    return {returned}\n")
    with pytest.raises(RewardFunctionError, match=rf"r\.py:r must return a list .* of real numbers.*{got}"):
        Scorer(ScoringConfig(rules=[RuleSpec(path=path, function="r")])).score([[]], ["a"])


def test_rule_may_return_a_tensor_or_an_array(tmp_path):
    path = _rule_file(
        tmp_path / "r.py",
        "import numpy as np, torch\n"
        "def t(prompts, completions, **_):\n    return torch.tensor([0.5] * len(completions))\n"
        "def n(prompts, completions, **_):\n    return np.full(len(completions), 2)\n",
    )
    rules = [RuleSpec(path=path, function="t"), RuleSpec(path=path, function="n")]
    assert Scorer(ScoringConfig(rules=rules)).score([[], []], ["a", "b"]).total.tolist() == [2.5, 2.5]


# ------------------------------------------------------------------------------------ a pipeline of one's own


def test_base_and_sft_on_a_parquet_of_sharegpt_rows_leave_out_overlong_ones(tmp_path):
    """No data stage: base trains its tokenizer on the user's file (base.train_data) and sft trains on it; the
    conversations longer than sft.max_length are left out and counted, not cut."""
    import yaml

    from posttrain.pipeline import load_pipeline, run_pipeline

    from .conftest import TINY, make_rows, write_pipeline

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = make_rows(24)
    long_answer = " ".join(["word"] * 200)
    rows[:3] = [{"messages": [r["messages"][0], {"role": "assistant", "content": long_answer}]} for r in rows[:3]]
    turns = [
        [{"from": m["role"].replace("assistant", "gpt"), "value": m["content"]} for m in r["messages"]] for r in rows
    ]
    pq.write_table(pa.table({"conversations": turns}), tmp_path / "chat.parquet")
    data = str(tmp_path / "chat.parquet")
    body = yaml.safe_dump(
        {
            "seed": 0,
            "stages": ["base", "sft"],
            "base": {**TINY, "family": "gemma", "train_data": data},
            "sft": {"train_data": data, "max_length": 128, "epochs": 1, "batch_size": 8, "eval_samples": 0},
        }
    )
    summary = run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
    assert summary["sft"]["train_rows_too_long"] == 3 and summary["sft"]["train_rows"] == 21, summary["sft"]


def test_null_nan_and_empty_csv_cells_are_missing_values(tmp_path):
    """A null answer (JSON null, a Parquet NaN, an empty CSV cell) is a row without an oracle answer: left out
    of the row, so accuracy does not count it and a blank completion cannot match it; text such as "NA" stays."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "e.csv").write_text("prompt,task,answer\nWhat is 1 + 1?,add,2\nWhat is 2 + 2?,add,\nSay NA.,echo,NA\n")
    rows = read_rows(str(tmp_path / "e.csv"), "prompt")
    assert [r.get("answer") for r in rows] == ["2", None, "NA"] and "answer" not in rows[1]
    table = pa.table({"prompt": ["a?", "b?"], "answer": pa.array([3.0, float("nan")], pa.float64())})
    pq.write_table(table, tmp_path / "n.parquet")
    rows = read_rows(str(tmp_path / "n.parquet"), "prompt")
    assert rows[0]["answer"] == 3.0 and "answer" not in rows[1]
    (tmp_path / "j.jsonl").write_text('{"prompt": "a?", "answer": null, "task": "t"}\n')
    assert read_rows(str(tmp_path / "j.jsonl"), "prompt") == [{"messages": [_user("a?")], "task": "t"}]
    out = tmp_path / "out.jsonl"
    write_jsonl(out, read_rows(str(tmp_path / "n.parquet"), "prompt"))
    assert "NaN" not in out.read_text()  # strict JSON readers refuse NaN
    assert answer_accuracy(read_rows(str(tmp_path / "e.csv"), "prompt"), ["2", "", "na"])["n"] == 2


def test_numeric_task_values_are_compared_as_text():
    acc = answer_accuracy([{"task": 3, "answer": "2"}, {"task": "add", "answer": "4"}], ["2", "5"])
    assert (acc["3"], acc["add"], acc["n"]) == (1.0, 0.0, 2)


def test_a_causal_lm_is_refused_as_a_reward_model(tmp_path, tiny_model_dir):
    """Scored as a sequence classifier, a causal LM would get a new random head and score without a word."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a reward model: it holds a model of architectures"):
        ScoringConfig(reward_model=str(tiny_model_dir))
    implicit = tmp_path / "implicit"
    shutil.copytree(tiny_model_dir, implicit)
    (implicit / "reward_head.json").write_text('{"head": "implicit", "beta": 1.0}\n')
    assert ScoringConfig(reward_model=str(implicit)).reward_model == str(implicit)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_a_column_some_rows_lack_reaches_the_rules_that_name_it_with_none_there(tmp_path):
    """One null in a column a rule reads through a defaulted parameter: that row gets None, the others their
    values (it used to vanish for the whole batch); a rule that does not name the column does not get it."""
    (tmp_path / "r.py").write_text(
        "def expects(prompts, completions, expected=None):\n"
        "    return [0.0 if e is None else float(e in c) for c, e in zip(completions, expected or [None] * 3)]\n"
        "def plain(prompts, completions):\n"
        "    return [1.0] * len(completions)\n"
    )
    rules = [RuleSpec(path=str(tmp_path / "r.py"), function=f) for f in ("expects", "plain")]
    scorer = Scorer(ScoringConfig(rules=rules, use_reward_model=False))
    rows = [{"expected": "a"}, {}, {"expected": "c"}]
    scores = scorer.score([[_user("q")]] * 3, ["a", "b", "c"], rows)
    assert scores.parts["expects"].tolist() == [1.0, 0.0, 1.0] and scores.parts["plain"].tolist() == [1.0] * 3


def test_normalize_whitens_what_trains_and_reports_the_judges_sum(tmp_path):
    (tmp_path / "r.py").write_text("def length(prompts, completions, **_):\n    return [len(c) for c in completions]\n")
    rule = RuleSpec(path=str(tmp_path / "r.py"), function="length", weight=2.0)
    scorer = Scorer(ScoringConfig(rules=[rule], use_reward_model=False, normalize=True))
    scores = scorer.score([[_user("q")]] * 3, ["a", "bb", "cccc"], None, training=True)
    assert scores.raw.tolist() == [2.0, 4.0, 8.0] and abs(scores.total.mean().item()) < 1e-6


def test_a_rule_file_imports_the_modules_beside_it(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "helpers_for_posttrain_test.py").write_text("def norm(t):\n    return t.strip().lower()\n")
    (tmp_path / "rules" / "r.py").write_text(
        "from helpers_for_posttrain_test import norm\n"
        "def same(prompts, completions, **_):\n    return [float(norm(c) == 'a') for c in completions]\n"
    )
    scorer = Scorer(ScoringConfig(rules=[RuleSpec(path=str(tmp_path / "rules" / "r.py"), function="same")]))
    assert scorer.score([[_user("q")]] * 2, [" A ", "b"]).total.tolist() == [1.0, 0.0]


def test_use_margin_on_pairs_without_a_margin_is_refused(tmp_path, tiny_model_dir):
    """Margins asked for, none in the data: said before training (it would have trained as without them)."""
    from posttrain.pipeline import load_pipeline, run_pipeline

    from .conftest import write_pipeline

    pair = {"prompt": "2 + 2?", "chosen": "4", "rejected": "5", "score_chosen": 9.0, "score_rejected": 2.0}
    write_jsonl(tmp_path / "pairs.jsonl", [pair] * 4)
    body = f"stages: [rm]\nrm: {{model: {tiny_model_dir}, prefs_train: {tmp_path / 'pairs.jsonl'}, use_margin: true}}\n"
    with pytest.raises(ValueError, match="rm.use_margin is true, but none of the 4 training pairs has a 'margin'"):
        run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))
