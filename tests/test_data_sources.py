"""Data sources: every format to hand-written canonical rows, every file type, mixtures, limits, errors that
name file/row/column, skipping, config validation, fingerprints, the `posttrain data` CLI, and sft on
users' own files."""

import csv
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.config import ConfigError, undocumented_fields
from posttrain.data import (
    DataError,
    SkipReport,
    SourceSpec,
    as_specs,
    read_rows,
    source_files,
    to_canonical,
    write_jsonl,
)
from posttrain.pipeline import _resolve_inputs, load_pipeline, run_pipeline
from posttrain.stages.rm import read_pairs
from posttrain.stages.sft import SFT

from .conftest import write_pipeline


def U(text):  # noqa: N802 - short names keep the expected rows readable
    return {"role": "user", "content": text}


def A(text):  # noqa: N802
    return {"role": "assistant", "content": text}


def S(text):  # noqa: N802
    return {"role": "system", "content": text}


# ----------------------------------------------------------------------------------------------
# Formats: each layout, read from a JSONL with the format detected, gives exactly these rows

CASES = {
    "messages": (
        [{"messages": [U("2+2?"), A("4"), U("and 3+3?"), A("6")], "task": "add", "answer": "6"}],
        [{"messages": [U("2+2?"), A("4"), U("and 3+3?"), A("6")], "task": "add", "answer": "6"}],
    ),
    "messages_content_parts": (
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Part A"}, {"type": "text", "text": "B"}]},
                    A("ok"),
                ]
            }
        ],
        [{"messages": [U("Part A\nB"), A("ok")]}],
    ),
    "messages_system_fold": (
        [{"messages": [S("Be brief."), U("Hi"), A("Hello")]}],
        [{"messages": [U("Be brief.\n\nHi"), A("Hello")]}],
    ),
    "sharegpt": (
        [
            {
                "conversations": [
                    {"from": "system", "value": "You are kind."},
                    {"from": "human", "value": "q1"},
                    {"from": "gpt", "value": "a1"},
                    {"from": "user", "value": "q2"},
                    {"from": "model", "value": "a2"},
                ],
                "id": 7,
            }
        ],
        [{"messages": [U("You are kind.\n\nq1"), A("a1"), U("q2"), A("a2")], "id": 7}],
    ),
    "alpaca": (
        [
            {"instruction": "Sort the list.", "input": "3, 1, 2", "output": "1, 2, 3"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        ],
        [{"messages": [U("Sort the list.\n\n3, 1, 2"), A("1, 2, 3")]}, {"messages": [U("Say hi."), A("Hi!")]}],
    ),
    "prompt_completion": (
        [
            {"prompt": "Capital of France?", "completion": "Paris."},
            {"prompt": [U("Capital of Italy?")], "completion": [A("Rome.")], "answer": "Rome"},
        ],
        [
            {"messages": [U("Capital of France?"), A("Paris.")]},
            {"messages": [U("Capital of Italy?"), A("Rome.")], "answer": "Rome"},
        ],
    ),
}
PAIR_CASES = {
    "preference_strings": (
        [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5}],
        [{"chosen": [U("2+2?"), A("4")], "rejected": [U("2+2?"), A("5")], "margin": 1.5}],
    ),
    "preference_lists": (
        [{"prompt": [U("Hi"), A("Hello"), U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}],
        [{"chosen": [U("Hi"), A("Hello"), U("2+2?"), A("4")], "rejected": [U("Hi"), A("Hello"), U("2+2?"), A("5")]}],
    ),
    "preference_repeated_prompt": (  # UltraFeedback-binarized: chosen = [user, assistant]
        [{"prompt": "2+2?", "chosen": [U("2+2?"), A("4")], "rejected": [U("2+2?"), A("5")], "score_chosen": 9.0}],
        [{"chosen": [U("2+2?"), A("4")], "rejected": [U("2+2?"), A("5")], "score_chosen": 9.0}],
    ),
    "preference_whole_conversations": (  # what the prefs stage writes
        [{"chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")], "source": "teacher"}],
        [{"chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")], "source": "teacher"}],
    ),
    "hh": (
        [
            {
                "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: "
                "Why did the chicken cross the road?",
                "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No.",
            }
        ],
        [
            {
                "chosen": [U("Hi there"), A("Hello!"), U("Tell me a joke."), A("Why did the chicken cross the road?")],
                "rejected": [U("Hi there"), A("Hello!"), U("Tell me a joke."), A("No.")],
            }
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_conversation_formats_give_the_rows_written_by_hand(tmp_path, case):
    rows, expected = CASES[case]
    write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_rows(str(tmp_path / "d.jsonl"), "conversation") == expected


@pytest.mark.parametrize("case", sorted(PAIR_CASES))
def test_preference_formats_give_the_pairs_written_by_hand(tmp_path, case):
    rows, expected = PAIR_CASES[case]
    write_jsonl(tmp_path / "p.jsonl", rows)
    assert read_rows(str(tmp_path / "p.jsonl"), "preference") == expected
    assert read_pairs(str(tmp_path / "p.jsonl")) == expected  # the rm stage's reader


def test_prompt_format_and_prompt_kind(tmp_path):
    write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "Name a color.", "task": "gen"}, {"prompt": [S("Be terse."), U("Hi"), A("Hello"), U("Bye?")]}],
    )
    expected = [
        {"messages": [U("Name a color.")], "task": "gen"},
        {"messages": [U("Be terse.\n\nHi"), A("Hello"), U("Bye?")]},
    ]
    assert read_rows(str(tmp_path / "p.jsonl"), "prompt") == expected
    # a conversation read as prompts loses its final answer; a trainer refuses prompt-only data
    write_jsonl(tmp_path / "c.jsonl", CASES["messages"][0])
    assert read_rows(str(tmp_path / "c.jsonl"), "prompt") == [
        {"messages": [U("2+2?"), A("4"), U("and 3+3?")], "task": "add", "answer": "6"}
    ]
    with pytest.raises(DataError, match=r"p\.jsonl: format 'prompt' has prompts only.*columns found: prompt, task"):
        read_rows(str(tmp_path / "p.jsonl"), "conversation")


def test_system_turns_fold_drop_or_error():
    row = {"messages": [S("Rule one."), S("Rule two."), U("Hi"), A("Hello")]}
    assert to_canonical(row, "messages", "conversation", "fold")["messages"] == [
        U("Rule one.\n\nRule two.\n\nHi"),
        A("Hello"),
    ]
    assert to_canonical(row, "messages", "conversation", "drop")["messages"] == [U("Hi"), A("Hello")]
    with pytest.raises(ValueError, match="message 0: a system turn"):
        to_canonical(row, "messages", "conversation", "error")
    with pytest.raises(ValueError, match="no user turn after it"):
        to_canonical({"messages": [U("Hi"), A("Hello"), S("late")]}, "messages", "conversation", "fold")


def test_detection_names_candidates_or_formats(tmp_path):
    write_jsonl(tmp_path / "both.jsonl", [{"messages": [U("q"), A("a")], "conversations": [], "x": 1}])
    with pytest.raises(
        DataError,
        match=r"both\.jsonl: the columns fit several formats: messages, sharegpt; set "
        r"format.*columns found: messages, conversations, x",
    ):
        read_rows(str(tmp_path / "both.jsonl"))
    assert read_rows({"path": str(tmp_path / "both.jsonl"), "format": "messages"}) == [
        {"messages": [U("q"), A("a")], "conversations": [], "x": 1}
    ]
    # UltraFeedback-binarized: pair columns and a `messages` column. A pair reader takes the pair format
    # itself; a reader of any kind (posttrain data preview) is told which format gives which kind of row.
    from posttrain.data.formats import FormatError, detect_format

    ultrafeedback = ["prompt", "chosen", "rejected", "messages", "score_chosen"]
    assert detect_format(ultrafeedback, "preference") == "preference"
    assert detect_format(ultrafeedback, "conversation") == "messages"
    with pytest.raises(FormatError, match=r"messages \(a conversation row\), preference \(a preference row\)"):
        detect_format(ultrafeedback)
    write_jsonl(tmp_path / "none.jsonl", [{"question": "q", "response": "a"}])
    with pytest.raises(
        DataError,
        match=r"no known format has these columns.*"
        r"alpaca \(instruction, output\[, input\]\).*"
        r"columns found: question, response",
    ):
        read_rows(str(tmp_path / "none.jsonl"))
    renamed = {"path": str(tmp_path / "none.jsonl"), "columns": {"question": "prompt", "response": "completion"}}
    assert read_rows(renamed) == [{"messages": [U("q"), A("a")]}]
    with pytest.raises(DataError, match=r"columns: no column 'questio' to rename \(columns found: question, response"):
        read_rows({"path": str(tmp_path / "none.jsonl"), "columns": {"questio": "prompt"}})
    write_jsonl(tmp_path / "pairs.jsonl", PAIR_CASES["preference_strings"][0])
    with pytest.raises(DataError, match="fit format 'preference', which gives preference pairs"):
        read_rows(str(tmp_path / "pairs.jsonl"), "conversation")


# ----------------------------------------------------------------------------------------------
# File types


ALPACA = [
    {"instruction": f"Repeat {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i}", "answer": f"00{i}"}
    for i in range(5)
]
ALPACA_ROWS = [
    {"messages": [U(f"Repeat {i}." + ("" if i % 2 else f"\n\nn={i}")), A(f"{i}")], "answer": f"00{i}"} for i in range(5)
]


def write_rows(path, rows):
    """Write rows in the layout a file type stores them in."""
    from datasets import Dataset, DatasetDict

    path.parent.mkdir(parents=True, exist_ok=True)
    kind = path.name.split(".", 1)[1] if "." in path.name else path.name
    if kind == "jsonl" or kind == "lines.json":
        write_jsonl(path, rows)
    elif kind == "array.json":
        path.write_text(json.dumps(rows, indent=2))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "arrow":
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)
    elif kind == "disk":
        Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "diskdict":
        DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.lines.json", "d.array.json", "d.parquet", "d.csv", "d.arrow", "d.disk"])
def test_each_file_type_reads(tmp_path, name):
    path = write_rows(tmp_path / name, ALPACA)
    assert read_rows(path) == ALPACA_ROWS  # "007"-style answers stay strings in every type


def test_dataset_dict_and_directories_pick_a_split(tmp_path):
    path = write_rows(tmp_path / "d.diskdict", ALPACA)
    assert read_rows({"path": path, "split": "test"}) == ALPACA_ROWS[:2]
    with pytest.raises(DataError, match=r"several splits \(train, test\); set split"):
        read_rows(path)
    with pytest.raises(DataError, match=r"no split 'dev'; available splits: train, test"):
        read_rows({"path": path, "split": "dev"})
    folder = tmp_path / "folder"
    write_rows(folder / "data" / "train-00000.parquet", ALPACA)
    write_rows(folder / "data" / "test-00000.parquet", ALPACA[3:])
    assert read_rows({"path": str(folder), "split": "test"}) == ALPACA_ROWS[3:]


def test_a_cached_hub_data_set_is_read_and_an_absent_one_is_not_downloaded(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "datasets--someone--chat"
    write_rows(repo / "snapshots" / "abc123" / "data" / "train-00000-of-00001.parquet", ALPACA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert read_rows("someone/chat") == ALPACA_ROWS
    assert source_files("someone/chat") == [str(repo / "refs")]
    with pytest.raises(DataError, match=r"'someone/other'.*not.*local Hugging Face cache.*Nothing is downloaded"):
        read_rows("someone/other")


def test_json_array_streams_and_reports_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": "c", "completion": "d"},\n {"prompt": }\n]')
    with pytest.raises(DataError, match=r"a\.json:4: invalid JSON in row 3"):
        read_rows(str(path))


# ----------------------------------------------------------------------------------------------
# Mixtures and limits


def _numbered(tmp_path, name, n):
    rows = [{"messages": [U(f"{name} {i}"), A("ok")], "src": name, "i": i} for i in range(n)]
    return write_rows(tmp_path / f"{name}.jsonl", rows)


def test_mixture_keeps_the_weights_and_follows_the_seed(tmp_path):
    mix = [{"path": _numbered(tmp_path, "a", 3000), "weight": 3}, {"path": _numbered(tmp_path, "b", 3000), "weight": 1}]
    rows = read_rows(mix, seed=0)
    share = Counter(r["src"] for r in rows)["a"] / len(rows)
    assert abs(share - 0.75) < 0.03, share
    assert 3000 <= len(rows) < 4300  # ends when a source runs out: a's 3000 rows, plus ~1000 of b's
    assert [r["i"] for r in rows if r["src"] == "a"] == list(range(Counter(r["src"] for r in rows)["a"]))  # order kept
    assert read_rows(mix, seed=0) == rows
    assert read_rows(mix, seed=1) != rows
    assert [(r["src"], r["i"]) for r in read_rows(mix, seed=1)][:50] != [(r["src"], r["i"]) for r in rows][:50]


def test_limit_caps_and_seed_shuffles(tmp_path):
    path = _numbered(tmp_path, "a", 50)
    assert [r["i"] for r in read_rows({"path": path, "limit": 7})] == list(range(7))
    sample = [r["i"] for r in read_rows({"path": path, "limit": 7, "seed": 3})]
    assert len(sample) == len(set(sample)) == 7 and sample != list(range(7))
    assert [r["i"] for r in read_rows({"path": path, "limit": 7, "seed": 3})] == sample
    assert sorted(r["i"] for r in read_rows({"path": path, "seed": 4})) == list(range(50))
    # in a mixture, a capped source ends the mixture when its rows are used up
    mix = [{"path": path, "limit": 10, "weight": 1}, {"path": _numbered(tmp_path, "b", 500), "weight": 1}]
    rows = read_rows(mix)
    assert Counter(r["src"] for r in rows)["a"] == 10 and len(rows) < 60


# ----------------------------------------------------------------------------------------------
# Errors


BAD = {  # format -> (good row, bad row, column at fault, message)
    "messages": (
        {"messages": [U("q"), A("a")]},
        {"messages": [U("q"), {"role": "robot", "content": "a"}]},
        "messages",
        r"message 1: unknown role 'robot', expected one of user, human",
    ),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
        "conversations",
        r"message 1: expected an object with 'from' and 'value', got \['from'\]",
    ),
    "alpaca": (
        {"instruction": "i", "input": "", "output": "o"},
        {"instruction": "i", "input": "", "output": None},
        "output",
        r"expected a string, got null",
    ),
    "prompt_completion": (
        {"prompt": "p", "completion": "c"},
        {"prompt": "p", "completion": 5},
        "completion",
        r"expected a non-empty list of messages, got int",
    ),
    "prompt": ({"prompt": "p"}, {"prompt": [U("p"), A("a")]}, "prompt", r"a prompt must end with a user turn"),
    "preference": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": [U("other"), A("b")]},
        "rejected",
        r"'rejected' is a whole conversation but its prompt turns differ from the 'prompt' column",
    ),
    "hh": (
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "Q: q A: b"},
        "rejected",
        r"expected a transcript of '\\n\\nHuman: \.\.\.'",
    ),
}


@pytest.mark.parametrize("fmt", sorted(BAD))
def test_a_malformed_row_names_file_row_column_and_columns(tmp_path, fmt):
    good, bad, column, message = BAD[fmt]
    kind = "preference" if fmt in ("preference", "hh") else ("prompt" if fmt == "prompt" else "conversation")
    cols = ", ".join(bad)
    path = write_rows(tmp_path / "d.jsonl", [good, good, bad, good])
    with pytest.raises(
        DataError, match=rf"d\.jsonl:3: {message}.* \(row 3; column '{column}'; columns found: {cols}\)"
    ):
        read_rows({"path": path, "format": fmt}, kind)
    if fmt == "alpaca":  # flat rows also go in a Parquet file: rows, not lines
        path = write_rows(tmp_path / "d.parquet", [good, good, bad, good])
        with pytest.raises(DataError, match=rf"d\.parquet: row 3: {message}.* \(column '{column}'; columns found"):
            read_rows({"path": path, "format": fmt}, kind)
    report = SkipReport()
    assert len(read_rows({"path": path, "format": fmt, "on_error": "skip"}, kind, skipped=report)) == 3
    assert report.as_dict()["skipped"] == 1 and report.examples[0]["where"].endswith(
        ":3" if path.endswith("l") else ": row 3"
    )


def test_skip_counts_per_reason_with_examples(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"messages": [U("q"), A("a")]})] * 3 + [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"messages": [U("q")]}),
        json.dumps({"messages": [U("q"), A(" ")]}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')
    report = SkipReport(max_examples=2)
    rows = read_rows({"path": str(path), "on_error": "skip"}, skipped=report)
    assert len(rows) == 3
    d = report.as_dict()
    assert (d["read"], d["kept"], d["skipped"]) == (8, 3, 5)
    assert d["reasons"] == {
        "invalid JSON": 1,
        "not a JSON object": 1,
        "no final assistant turn": 1,
        "empty content": 1,
        "invalid UTF-8": 1,
    }
    assert [e["where"] for e in d["examples"]] == [f"{path}:4", f"{path}:5"]
    with pytest.raises(DataError, match=r"mixed\.jsonl:4: invalid JSON"):
        read_rows(str(path))
    utf = tmp_path / "utf.jsonl"
    utf.write_bytes(json.dumps({"messages": [U("q"), A("a")]}).encode() + b'\n{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r"utf\.jsonl:2: invalid UTF-8 \(byte 15 of the line"):
        read_rows(str(utf))


def test_file_level_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"data source '.*missing\.jsonl'.*path does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        read_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read it as parquet"):
        read_rows(str(tmp_path / "broken.parquet"))
    (tmp_path / "latin1.csv").write_bytes(b"instruction,output\nhi,there\ncaf\xe9,ok\n")
    with pytest.raises(DataError, match=r"latin1\.csv:3: invalid UTF-8"):
        read_rows(str(tmp_path / "latin1.csv"))
    write_rows(tmp_path / "ok.jsonl", ALPACA)
    with pytest.raises(DataError, match=r"format: Input should be 'messages', 'sharegpt'"):
        read_rows({"path": str(tmp_path / "ok.jsonl"), "format": "chatml"})
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_rows(str(tmp_path / "notes.txt"))


# ----------------------------------------------------------------------------------------------
# Config and pipeline


def test_config_errors_name_the_key(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "d.parquet", ALPACA)

    def load(sft):
        return load_pipeline(write_pipeline(tmp_path, f"stages: [sft]\nsft:\n  model: {tiny_model_dir}\n{sft}"))

    assert load(f"  train_data: {data}\n").sft.train_data == data
    cfg = load(f"  train_data: {{path: {data}, limit: 3, columns: {{output: output}}}}\n")
    assert cfg.sft.train_data == SourceSpec(path=data, limit=3, columns={"output": "output"})
    for value, message in [
        (f"{{path: {data}, formt: alpaca}}", r"sft\.train_data\.formt: unknown key.*pipeline\.yaml:5"),
        (f"{{path: {data}, limit: lots}}", r"sft\.train_data\.limit: .*integer.*'lots'"),
        ("{path: /no/such.parquet}", r"sft\.train_data\.path: .*path does not exist: '/no/such\.parquet'"),
        ("/no/such.parquet", r"sft\.train_data: .*path does not exist: '/no/such\.parquet'.*Nothing is downloaded"),
        (
            f"[{{path: {data}, weight: 1}}, {{path: {data}, weight: 0}}]",
            r"sft\.train_data\.1\.weight: .*greater than 0",
        ),
        (f"{{path: {data}, weight: 2}}", r"sft\.train_data: .*weight applies to the entries of a list"),
        ("5", r"sft\.train_data: .*expected a path, a mapping"),
        (f"{{path: {data}, split: test}}", r"sft\.train_data: .*split 'test' is set but .* is a single file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(f"  train_data: {value}\n")
    assert undocumented_fields(SourceSpec) == []


def test_sources_are_fingerprinted_by_files_and_settings_and_win_over_artifacts(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "d.parquet", ALPACA)
    artifacts = {"train_data": "/run/synth/train.jsonl", "model": str(tmp_path)}
    fps = {"train_data": "f1", "model": "f2"}

    def resolve(train_data):
        cfg = SFT.Config(model=str(tiny_model_dir), train_data=train_data)
        return _resolve_inputs("sft", SFT, cfg, artifacts, fps)

    inputs, first = resolve({"path": data, "limit": 3})
    assert inputs["train_data"] == {"path": data, "limit": 3}  # plain JSON, for manifests and launch.json
    assert as_specs(inputs["train_data"]) == [SourceSpec(path=data, limit=3)]
    assert resolve({"path": data, "limit": 3})[1] == first
    assert resolve({"path": data, "limit": 4})[1]["train_data"] != first["train_data"]
    assert resolve([{"path": data, "weight": 1}])[1]["train_data"] != first["train_data"]
    write_rows(tmp_path / "d.parquet", ALPACA[:4])
    assert resolve({"path": data, "limit": 3})[1]["train_data"] != first["train_data"]
    assert resolve(None)[0]["train_data"] == "/run/synth/train.jsonl"


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_preview_and_convert(tmp_path, capsys):
    from posttrain.cli import main

    src = write_rows(
        tmp_path / "qa.parquet",
        [{"question": f"q{i}", "response": f"r{i}", "task": "t"} for i in range(4)]
        + [{"question": "q", "response": None, "task": "t"}],
    )
    assert main(["data", "preview", src, "-n", "2", "--columns", "question=prompt,response=completion"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(x) for x in out] == [
        {"messages": [U("q0"), A("r0")], "task": "t"},
        {"messages": [U("q1"), A("r1")], "task": "t"},
    ]
    dst = tmp_path / "out" / "train.jsonl"
    args = ["data", "convert", src, str(dst), "--columns", "question=prompt,response=completion"]
    assert main(args) == 1
    assert "qa.parquet: row 5: null: no text (column 'completion' (renamed from 'response')" in capsys.readouterr().err
    assert not dst.exists() and not list(dst.parent.glob("*.tmp"))  # nothing half-written
    assert main(args + ["--on-error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 rows" in printed and '"skipped": 1' in printed
    assert read_rows(str(dst)) == [{"messages": [U(f"q{i}"), A(f"r{i}")], "task": "t"} for i in range(4)]
    parquet = str(tmp_path / "out.parquet")  # convert writes JSON lines: under another name it is refused
    assert main(["data", "convert", src, parquet, "--columns", "question=prompt,response=completion"]) == 2
    assert "out.parquet: convert writes JSON lines: name the file *.jsonl" in capsys.readouterr().err
    assert main(args + ["--on-error", "skip", "--limit", "2"]) == 0
    assert len(dst.read_text().splitlines()) == 2 and "wrote 2 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # as a config's `limit`, 0 is refused rather than read as "no limit"
        main(args + ["--limit", "0"])
    assert "--limit: expected 1 or more, got 0" in capsys.readouterr().err
    hh = write_rows(tmp_path / "hh.jsonl", PAIR_CASES["hh"][0])
    assert main(["data", "preview", hh, "--format", "hh"]) == 0
    assert json.loads(capsys.readouterr().out) == PAIR_CASES["hh"][1][0]
    assert main(["data", "preview", str(tmp_path / "nope.csv")]) == 1
    assert "path does not exist" in capsys.readouterr().err


def test_filter_reads_other_layouts_and_counts_their_bad_rows(tmp_path):
    from posttrain.stages.filter import FilterConfig, FilterStream

    rows = ALPACA + [
        {"instruction": "Repeat 1.", "input": "", "output": "1", "answer": "x"},  # an exact duplicate
        {"instruction": "Broken.", "input": "", "output": None, "answer": "y"},
    ]
    src = write_rows(tmp_path / "in.parquet", rows)
    off = {
        "structure": {"enabled": False},
        "pii": {"enabled": False},
        "unsafe": {"enabled": False},
        "identity": {"enabled": False},
        "dedup": {"near": False, "eval_overlap": False},
    }
    cfg = FilterConfig.model_validate({**off, "on_error": "skip"})
    report = FilterStream(cfg).run(src, tmp_path / "out.jsonl")
    assert read_rows(str(tmp_path / "out.jsonl")) == ALPACA_ROWS
    assert (report["rows"], report["kept"], report["malformed"]) == (6, 5, 1)
    assert report["filters"]["exact_dup"]["dropped"] == 1
    assert report["malformed_examples"][0]["text"].startswith(f"{src}: row 7: expected a string, got null")
    with pytest.raises(DataError, match=r"in\.parquet: row 7: expected a string"):
        FilterStream(FilterConfig.model_validate(off)).run(src, tmp_path / "out2.jsonl")
    assert report["malformed_examples"][0]["line"] == 7  # its row in the file
    mapped = FilterStream(cfg).run({"path": src, "seed": 1}, tmp_path / "out3.jsonl")  # filter.on_error applies
    assert (mapped["rows"], mapped["kept"], mapped["malformed"]) == (6, 5, 1)
    assert mapped["malformed_examples"][0]["line"] == 7  # shuffled: still its row in the file
    with pytest.raises(DataError, match=r"in\.parquet: row 7: expected a string"):  # its own on_error wins
        FilterStream(cfg).run({"path": src, "on_error": "raise"}, tmp_path / "out4.jsonl")


# ----------------------------------------------------------------------------------------------
# A stage trains on users' own files


@pytest.mark.parametrize("layout", ["alpaca.parquet", "sharegpt.json"])
def test_sft_trains_from_users_files(tmp_path, tiny_model_dir, layout):
    if layout == "alpaca.parquet":
        rows = [
            {"instruction": f"Sort these numbers: {i}, {i + 2}, 1", "input": "", "output": f"1, {i}, {i + 2}"}
            for i in range(2, 14)
        ]
        source = {"path": write_rows(tmp_path / "a.parquet", rows)}
    else:
        rows = [
            {
                "conversations": [
                    {"from": "system", "value": "Answer briefly."},
                    {"from": "human", "value": f"Count the letters in {'ab' * i}"},
                    {"from": "gpt", "value": str(2 * i)},
                ]
            }
            for i in range(1, 9)
        ]
        source = {"path": write_rows(tmp_path / "s.array.json", rows), "format": "sharegpt"}
    sft = {
        "model": str(tiny_model_dir),
        "train_data": source,
        "epochs": 1,
        "batch_size": 4,
        "max_length": 64,
        "eval_samples": 0,
        "gradient_checkpointing": False,
        "learning_rate": 1e-3,
    }
    summary = run_pipeline(load_pipeline(write_pipeline(tmp_path, f"stages: [sft]\nsft: {json.dumps(sft)}\n")))
    assert summary["sft"]["steps"] == len(rows) // 4  # one epoch over exactly the rows of the file
    assert summary["sft"]["train_loss"] > 0
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["inputs"]["train_data"] == source
    assert (tmp_path / "run" / "sft" / "model" / "model.safetensors").is_file()
