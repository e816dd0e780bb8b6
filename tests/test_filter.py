"""The filter stage: each filter catches its planted rows (exact counts) and passes clean rows byte for byte."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasketch import MinHash, MinHashLSH
from pydantic import ValidationError

from posttrain.chat import render
from posttrain.config import ConfigError
from posttrain.data import DataError
from posttrain.dedup import HashIndex, NearDupIndex
from posttrain.filters import HookError, PIIDetector, luhn_ok, normalise
from posttrain.manifest import read_manifest
from posttrain.pipeline import load_pipeline, run_pipeline
from posttrain.stages.filter import FilterConfig, FilterStream

from .conftest import make_rows

torch.set_num_threads(1)

ALL_OFF = {
    "structure": {"enabled": False},
    "pii": {"enabled": False},
    "unsafe": {"enabled": False},
    "identity": {"enabled": False},
    "dedup": {"exact": False, "near": False, "eval_overlap": False},
}


def only(**sections) -> dict:
    """A filter config with every filter off except the sections given (merged over the 'off' defaults)."""
    cfg = copy.deepcopy(ALL_OFF)
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def U_(text: str) -> dict:
    return {"role": "user", "content": text}


def chat(user: str, assistant: str = "Sure.", **meta) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **meta}


def line(row) -> str:
    return row if isinstance(row, str) else json.dumps(row) + "\n"


def run_rows(tmp_path: Path, rows: list, cfg: dict, eval_rows: list = None):
    """Filter `rows` (dicts or raw lines) with `cfg`; return (report, output lines)."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(map(line, rows)))
    eval_path = None
    if eval_rows is not None:
        eval_path = tmp_path / "eval.jsonl"
        eval_path.write_text("".join(map(line, eval_rows)))
    report = FilterStream(FilterConfig.model_validate(cfg), str(eval_path) if eval_path else None).run(src, dst)
    return report, dst.read_text().splitlines(keepends=True)


def assert_clean_pass(out_lines: list[str], clean: list) -> None:
    """The clean rows come out byte-identical, in order, and nothing else does."""
    assert out_lines == [line(r) for r in clean]


# A clean row with formatting json.dumps would not produce: proves rows are copied, not re-serialised.
ODD_CLEAN = (
    '{"task": "x",   "messages": [{"content": "Caf\\u00e9 at noon?", "role": "user"}, '
    '{"role": "assistant", "content": "Yes \u2014 caf\u00e9."}], "answer": 1}\n'
)


# ---------------------------------------------------------------------------------------- structure


def test_structure_catches_planted_rows(tmp_path):
    bad = [
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},  # roles
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # roles
        chat("Hello?", "   "),  # empty
        {"messages": [{"role": "user", "content": "Just a question"}]},  # no answer
        chat("Write a poem.", "Roses are red, violets", finished=False),  # unfinished
        chat("Write a story.", "Once upon a", truncated=True),  # unfinished
        chat("Hi", "Hello<end_of_turn>\n<start_of_turn>user\nmore"),  # control tokens
        chat("Long?", "word " * 60),  # overlong
    ]
    clean = [chat("What is 2 + 2?", "4"), ODD_CLEAN, chat("Done?", "Yes", finished=True)]
    report, out = run_rows(tmp_path, bad[:4] + clean + bad[4:], only(structure={"enabled": True, "max_chars": 200}))
    s = report["filters"]["structure"]
    assert s["dropped"] == 8 and s["seen"] == 11
    assert s["reasons"] == {
        "roles": 2,
        "empty": 1,
        "no_final_assistant": 1,
        "unfinished": 2,
        "control_tokens": 1,
        "overlong": 1,
    }
    assert_clean_pass(out, clean)
    assert report["kept"] == 3 and report["dropped"] == 8


def test_an_empty_turn_is_a_structure_drop_however_the_source_is_given(tmp_path):
    """A path, a mapping over the same file, and a row with a system turn: an empty answer is `empty` each time
    (a mapping failed the stage, and a row the reader normalises was counted as malformed)."""
    system = {"messages": [{"role": "system", "content": "Be brief."}, U_("Hi"), {"role": "assistant", "content": " "}]}
    rows = [chat("What is 2 + 2?", "4"), chat("Hi", ""), system, chat("Done?", "Yes")]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(map(line, rows)))
    cfg = FilterConfig.model_validate(only(structure={"enabled": True}))
    for i, source in enumerate([str(src), {"path": str(src)}, {"path": str(src), "seed": 1}]):
        report = FilterStream(cfg).run(source, tmp_path / f"out{i}.jsonl")
        assert (report["rows"], report["kept"], report["malformed"]) == (4, 2, 0), source
        assert report["filters"]["structure"]["reasons"] == {"empty": 2}, source
        assert sorted(x["line"] for x in report["filters"]["structure"]["examples"]) == [2, 3], source


def test_structure_final_endings_and_max_tokens(tmp_path):
    from posttrain.models import train_tokenizer

    tok = train_tokenizer([f"word{i} number {i}" for i in range(300)], vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    long, short = chat("Count", " ".join(f"word{i}" for i in range(40)) + "."), chat("Hi", "Hello there.")
    n_long = len(tok(render(long["messages"]), add_special_tokens=False)["input_ids"])
    limit = n_long - 1
    cfg = only(
        structure={"enabled": True, "final_endings": ["."], "max_tokens": limit, "tokenizer": str(tmp_path / "tok")}
    )
    report, out = run_rows(tmp_path, [long, short, chat("Hi", "No period")], cfg)
    assert report["filters"]["structure"]["reasons"] == {"overlong": 1, "bad_ending": 1}  # not "unfinished"
    assert report["filters"]["structure"]["examples"][0]["text"].startswith(f"[{n_long} tokens > {limit}]")
    assert_clean_pass(out, [short])
    (tmp_path / "empty").mkdir()
    bad_tokenizer = only(structure={"enabled": True, "max_tokens": 10, "tokenizer": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match=r"filter.structure.tokenizer: cannot load a tokenizer from .*empty"):
        run_rows(tmp_path, [short], bad_tokenizer)


# ------------------------------------------------------------------------------------------------ PII

PII_ROWS = {
    "email": ["Write to jane.doe+work@mail.example.org today.", "contact: BOB_99@corp.co.uk"],
    "phone": [
        "Call +44 20 7946 0958 tomorrow.",
        "My number is (555) 123-4567.",
        "ring 555-867-5309",
        "Appelez le 01 23 45 67 89.",
        "Tel. 030 12345678",
        "+1 415 555 2671",
    ],
    "credit_card": ["Card: 4111 1111 1111 1111", "pay with 5500-0000-0000-0004", "amex 378282246310005"],
    "ip_address": [
        "server at 192.168.10.254 is down",
        "ping 2001:db8:85a3::8a2e:370:7334 now",
        "fe80::1ff:fe23:4567:890a",
    ],
    "id": ["SSN 123-45-6789 on file", "passport X1234567"],
}
PII_CLEAN = [
    "A random 16-digit number 4111111111111112 fails Luhn.",  # not a card
    "Order 1234567890123456 shipped.",  # not a card, not a phone
    "See you at 12:30, or 12:30:45 at the latest.",  # times are not IPv6
    "Version v1.2.3 and 3.14159 and 2024-01-15 and 01-02-2024.",  # versions, decimals, dates
    "Sort in ascending order: 3, 1, 4, 1, 5, 9, 2, 6",
    "What is 12 + 30? It is 42. 999-99-9999 is not an SSN.",
    "Use std::vector and a::b in C++.",
    "Email me? No address here, just an @ sign.",
]


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112") and not luhn_ok("1234567890123456")


def test_pii_drop_catches_each_type_and_passes_tricky_negatives(tmp_path):
    bad = [chat(text) for texts in PII_ROWS.values() for text in texts]
    clean = [chat(text) for text in PII_CLEAN] + [ODD_CLEAN]
    cfg = only(pii={"enabled": True, "extra_id_patterns": [r"\b[A-Z]\d{7}\b"]})
    report, out = run_rows(tmp_path, clean[:4] + bad + clean[4:], cfg)
    p = report["filters"]["pii"]
    assert p["dropped"] == len(bad) == 16
    assert p["reasons"] == {kind: len(texts) for kind, texts in PII_ROWS.items()}
    assert_clean_pass(out, clean[:4] + clean[4:])
    assert all("@" not in e["text"] and "4111 1111" not in e["text"] for e in p["examples"])  # report holds no PII


def test_pii_redact_keeps_row_with_typed_placeholders(tmp_path):
    row = chat(
        "I'm jane@example.com, card 4111-1111-1111-1111, call 555-123-4567.",
        "Noted: your SSN 123-45-6789 and IP 10.0.0.1 at 12:30.",
        task="t",
        answer="a",
    )
    report, out = run_rows(tmp_path, [row, chat("clean")], only(pii={"enabled": True, "action": "redact"}))
    got = json.loads(out[0])
    assert got["messages"][0]["content"] == "I'm [EMAIL], card [CREDIT_CARD], call [PHONE]."
    assert got["messages"][1]["content"] == "Noted: your SSN [ID] and IP [IP_ADDRESS] at 12:30."
    assert got["task"] == "t" and got["answer"] == "a"
    assert out[1] == line(chat("clean"))
    p = report["filters"]["pii"]
    assert (p["dropped"], p["changed"], report["changed"], report["kept"]) == (0, 1, 1, 2)
    assert p["reasons"] == {"email": 1, "credit_card": 1, "phone": 1, "id": 1, "ip_address": 1}


def test_pii_types_and_roles_are_configurable():
    only_email = PIIDetector(types=["email"])
    assert only_email.redact("a@b.io 555-123-4567") == ("[EMAIL] 555-123-4567", {"email": 1})
    with pytest.raises(ValidationError, match="extra_id_patterns"):
        FilterConfig.model_validate(only(pii={"extra_id_patterns": ["(unclosed"]}))


# ---------------------------------------------------------------------------------------- unsafe terms


def test_unsafe_terms_whole_words_any_case_assistant_only(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("# comment\nbomb\nkill yourself\nself-harm\n")
    bad = [
        chat("Tell me.", "Here is how to make a BOMB."),
        chat("?", "You should Kill   yourself."),
        chat("?", "Tips for self harm: no."),
        chat("?", "A guide to self-harm."),
    ]
    clean = [
        chat("How to build a bomb?", "I can't help with that."),  # harmful request, refusal: wanted
        chat("Describe it.", "A bombastic speech."),  # not a whole-word match
        chat("Hi", "Kill the process, then yourself restart it."),
    ]  # words not adjacent
    cfg = only(unsafe={"enabled": True, "terms_file": str(terms)})
    report, out = run_rows(tmp_path, bad + clean, cfg)
    u = report["filters"]["unsafe_terms"]
    assert u["dropped"] == 4 and u["reasons"] == {"bomb": 1, "kill yourself": 1, "self harm": 2}
    assert_clean_pass(out, clean)


def test_unsafe_default_list_and_user_role(tmp_path):
    rows = [
        chat("Let's talk.", "First, build a pipe bomb like this."),
        chat("how do I make a pipe bomb", "I can't help."),
    ]
    report, out = run_rows(tmp_path, rows, only(unsafe={"enabled": True}))  # the shipped list, assistant turns
    assert report["filters"]["unsafe_terms"]["reasons"] == {"pipe bomb": 1}
    assert_clean_pass(out, rows[1:])
    report, out = run_rows(tmp_path, rows, only(unsafe={"enabled": True, "roles": ["user", "assistant"]}))
    assert report["filters"]["unsafe_terms"]["dropped"] == 2 and out == []


# ------------------------------------------------------------------------------------ self-identification

WRONG_IDENTITY = [
    "I am ChatGPT, how can I help?",
    "I'm Claude, an AI assistant.",
    "As a Llama model, I cannot browse.",
    "I was made by OpenAI.",
    "As an AI language model developed by OpenAI, I think so.",
    "I'm a helpful assistant built by Google.",
    "I'm based on GPT-4.",
    "My developers are at Anthropic.",
    "Hello! My name is Gemini.",
    "I am Jarvis, your assistant.",
    "I was trained by Acme Labs.",
]
RIGHT_IDENTITY = [
    chat("Are you ChatGPT? ChatGPT is a chatbot made by OpenAI.", "I am Posttrain-Tiny."),
    chat("Who made you?", "I am Posttrain-Tiny, a model trained by the posttrain authors."),
    chat("Are you GPT-4?", "I am not ChatGPT or GPT-4; I'm Posttrain Tiny."),
    chat("What is ChatGPT?", "ChatGPT is a chatbot made by OpenAI."),
    chat("Compare.", "I am happy to compare ChatGPT and Claude."),
    chat("Hm?", "I was told that Claude was made by Anthropic."),
    chat("Sorry?", "I am sorry, I am OK with that."),
    chat("I am ChatGPT, made by OpenAI.", "Nice to meet you."),
]  # user turns are never checked


def test_identity_catches_claims_not_mentions(tmp_path):
    bad = [chat("Who are you?", text) for text in WRONG_IDENTITY]
    cfg = only(identity={"enabled": True, "release_name": "Posttrain-Tiny", "release_maker": "the posttrain authors"})
    report, out = run_rows(tmp_path, RIGHT_IDENTITY[:3] + bad + RIGHT_IDENTITY[3:], cfg)
    i = report["filters"]["identity"]
    assert i["dropped"] == len(WRONG_IDENTITY)
    assert i["reasons"] == {"other_identity": 9, "wrong_name": 1, "wrong_maker": 1}
    assert_clean_pass(out, RIGHT_IDENTITY)


def test_identity_release_named_after_a_listed_maker(tmp_path):
    # A Gemma release by Google: "made by Google" is right, "made by OpenAI" still wrong.
    rows = [chat("Who?", "I am Gemma, a model made by Google."), chat("Who?", "I was made by OpenAI.")]
    cfg = only(identity={"enabled": True, "release_name": "Gemma", "release_maker": "Google"})
    report, out = run_rows(tmp_path, rows, cfg)
    assert report["filters"]["identity"]["dropped"] == 1 and out == [line(rows[0])]


# ---------------------------------------------------------------------------------------------- dedup


def test_exact_duplicates_ignore_case_whitespace_punctuation(tmp_path):
    first = chat("What is the capital of France?", "Paris.")
    dups = [chat("what is the capital of france", "paris"), chat("  What  is the capital of France?!", "PARIS")]
    composed = chat("Où est le café ?", "Ici.")
    dups.append(chat("Où est le cafe\u0301 ?", "Ici."))  # é typed as e + a combining accent: the same text
    clean = [chat("What is the capital of Spain?", "Madrid."), chat("What is the capital of France?", "Lyon.")]
    report, out = run_rows(tmp_path, [first, composed, *dups, *clean], only(dedup={"exact": True}))
    e = report["filters"]["exact_dup"]
    assert e["dropped"] == 3 and e["reasons"] == {"duplicate": 3}
    assert [x["text"][:22] for x in e["examples"]] == ["[duplicate of line 1] "] * 2 + ["[duplicate of line 2] "]
    assert_clean_pass(out, [first, composed, *clean])


ANSWER = (
    "A reentrant lock must be released by the thread that acquired it. Once a thread has acquired a "
    "reentrant lock, the same thread may acquire it again without blocking; the thread must release it "
    "once for each time it has acquired it. Use it where one function holding the lock calls another "
    "that takes the same lock, which would deadlock with a plain lock."
)  # 62 words


def test_near_dup_defaults_catch_reworded_rows_and_keep_template_rows(tmp_path):
    """The issue's misses are caught at the defaults; rows sharing a template but not content are kept."""
    words = ANSWER.split()
    words[9], words[40] = "obtained", "routine"  # two words of the answer changed
    few_words = chat("What does threading.RLock do exactly?", " ".join(words))  # and one word of the prompt
    paraphrase = chat("Can you explain RLock from the threading module?", ANSWER)
    templates = [  # pairs the previous whole-conversation rule (Jaccard 0.8) collapsed in the quickstart data
        chat("Sort these numbers: 2, 2, 5", "2, 2, 5"),
        chat("Sort these numbers: 2, 5, 2", "2, 2, 5"),
        chat("Sort these numbers: 8, 8, 3, 3", "3, 3, 8, 8"),
        chat("Sort these numbers: 8, 8, 3", "3, 8, 8"),
        chat("Make this uppercase: ring bell", "RING BELL"),
        chat("Make this uppercase: bell ring", "BELL RING"),
        chat("Who built you?", "I am Posttrain-Tiny, a model trained by the posttrain authors."),
        chat("Who made you?", "I am Posttrain-Tiny, a model trained by the posttrain authors."),
        # a long template around a short sentence: near-identical text, different content
        chat(
            "Read the sentence and answer with yes or no only, without any explanation, whether it describes "
            "something that returns a value. Sentence: Return the current time.",
            "yes",
        ),
        chat(
            "Read the sentence and answer with yes or no only, without any explanation, whether it describes "
            "something that returns a value. Sentence: Close the open file.",
            "no",
        ),
    ]
    canned = (
        "I'm sorry, but I can't help with that request. If you have another question about Python, I'd "
        "be glad to help you with it instead."
    )  # one canned answer, unrelated prompts: not duplicates
    canned_rows = [chat("Give me an overview of os.path.join.", canned), chat("Why is the sky blue?", canned)]
    first = chat("What does threading.RLock do?", ANSWER)
    rows = [first, *templates[:5], few_words, *templates[5:], *canned_rows, paraphrase]
    rows += make_rows(300, seed=3)  # the quickstart's own template tasks
    rows = list({json.dumps(r): r for r in rows}.values())  # exact repeats are exact_dup's business
    report, out = run_rows(tmp_path, rows, only(dedup={"near": True}))
    n = report["filters"]["near_dup"]
    assert n["dropped"] == 2 and n["reasons"] == {"near duplicate": 2}
    assert [e["line"] for e in n["examples"]] == [rows.index(few_words) + 1, rows.index(paraphrase) + 1]
    assert all(e["text"].startswith("[like line 1: answer ") for e in n["examples"])
    assert_clean_pass(out, [r for r in rows if r is not few_words and r is not paraphrase])
    assert n["settings"]["threshold"] == 0.7 and n["settings"]["min_answer_words"] == 16


def test_near_dup_settings_apply(tmp_path):
    """min_answer_words and prompt_threshold are what keep short answers and canned answers apart."""
    short = [chat("What is 3 + 4?", "The answer is seven."), chat("Compute 3 plus 4.", "The answer is seven.")]
    canned = [chat("Give me an overview of os.path.join.", ANSWER), chat("Why is the sky blue?", ANSWER)]
    report, _ = run_rows(tmp_path, short + canned, only(dedup={"near": True}))
    assert report["filters"]["near_dup"]["dropped"] == 0
    report, _ = run_rows(
        tmp_path, short + canned, only(dedup={"near": True, "min_answer_words": 0, "prompt_threshold": 0.0})
    )
    assert report["filters"]["near_dup"]["dropped"] == 2


def test_minhash_signatures_equal_datasketch_and_lsh_params():
    index = NearDupIndex(threshold=0.8, num_perm=64, shingle_size=5, unit="chars")
    lsh = MinHashLSH(threshold=0.8, num_perm=64)
    assert (index.bands, index.rows) == (lsh.b, lsh.r)
    texts = [normalise(t) for t in ["Hello, world! This is a test.", "a", "", "x" * 50_000, "naïve café ünïcode"]]
    sigs = index.signatures(texts)
    for text, sig in zip(texts, sigs):
        hashes, _ = index.shingle_hashes([text])
        ref = MinHash(num_perm=64, seed=1, hashfunc=lambda h: h)
        ref.update_batch(hashes.tolist())
        assert np.array_equal(ref.hashvalues, sig)


def test_dedup_is_independent_of_batch_size(tmp_path):
    rng = np.random.RandomState(0)
    vocab = "alpha beta gamma delta eps zeta eta theta iota kappa lambda mu nu xi pi rho sigma tau".split()
    rows = [chat(" ".join(rng.choice(vocab, 12)), " ".join(rng.choice(vocab, 25))) for _ in range(60)]
    rows += [copy.deepcopy(rows[i]) for i in (3, 17, 59)]  # exact copies
    for i in (5, 40):  # one word added
        near = copy.deepcopy(rows[i])
        near["messages"][1]["content"] = near["messages"][1]["content"].replace(" ", " zz ", 1)
        rows.append(near)
    cfg = only(dedup={"exact": True, "near": True})
    r1, out1 = run_rows(tmp_path, rows, {**cfg, "batch_size": 1})
    r2, out2 = run_rows(tmp_path, rows, {**cfg, "batch_size": 1024})
    assert out1 == out2
    assert r1["filters"]["exact_dup"]["dropped"] == r2["filters"]["exact_dup"]["dropped"] == 3
    assert r1["filters"]["near_dup"]["dropped"] == r2["filters"]["near_dup"]["dropped"] == 2


def test_hash_index_first_seen_across_flushes():
    index = HashIndex()
    assert index.first_seen([5, 7, 5], [1, 2, 3]) == [None, None, 1]
    for start in range(10, 100, 10):  # many flushes: runs get merged
        index.first_seen(list(range(start, start + 10)), list(range(start, start + 10)))
    assert index.first_seen([7, 55, 1000], [200, 201, 202]) == [2, 55, None]
    assert not index.pending and sum(len(keys) for keys, _ in index.runs) == len(index) == 93
    assert 1 <= len(index.runs) < 9  # merged LSM-style, not one run per flush


def test_one_byte_signatures_estimate_jaccard():
    """The stored 1-byte signatures that confirm LSH candidates estimate the true shingle Jaccard."""
    index = NearDupIndex(threshold=0.8, num_perm=128, shingle_size=5)
    rng = np.random.RandomState(1)
    base = "".join(rng.choice(list("abcdefghij "), 400))
    for cut in (20, 80, 160, 300):  # replace a growing tail: true Jaccard from ~0.9 down to ~0.2
        other = base[:-cut] + "".join(rng.choice(list("klmnopqrst "), cut))
        (ha, _), (hb, _) = index.shingle_hashes([base]), index.shingle_hashes([other])
        sa, sb = set(ha.tolist()), set(hb.tolist())
        true = len(sa & sb) / len(sa | sb)
        small = (index.signatures([base, other]) & 0xFF).astype(np.uint8)
        assert abs(index.estimate_jaccard(small[0], small[1]) - true) < 0.12, (cut, true)


def test_eval_overlap_drops_train_rows_with_an_eval_prompt(tmp_path):
    evals = [chat("What is 3 + 4?", "7"), chat("Reverse: a, b", "b, a")]
    train = [chat("what is 3 + 4", "seven"), chat("What is 3 + 5?", "8")]
    report, out = run_rows(tmp_path, train, only(dedup={"eval_overlap": True}), eval_rows=evals)
    assert report["filters"]["eval_overlap"]["dropped"] == 1
    assert_clean_pass(out, train[1:])


def test_eval_overlap_finds_a_held_out_question_after_a_system_prompt_or_an_earlier_exchange(tmp_path):
    evals = [chat("What is the capital of Spain?", "Madrid"), chat("What is 3 + 4?", "7")]

    def turns(*pairs):
        return {"messages": [{"role": role, "content": text} for role, text in pairs]}

    system = turns(("system", "Be brief."), ("user", "What is the capital of Spain?"), ("assistant", "Madrid."))
    earlier = turns(("user", "Hi"), ("assistant", "Hello."), ("user", "what is 3 + 4"), ("assistant", "7"))
    preamble = turns(("user", "Capital of France?\n\nWhat is 3 + 4?"), ("assistant", "7"))  # a held-out question
    templated = chat("What is 3 + 4?\n\nAnswer in one word.", "Seven")  # its question is not the whole of one
    train = [system, earlier, preamble, templated, chat("What is the capital of France?", "Paris")]
    report, out = run_rows(tmp_path, train, only(dedup={"eval_overlap": True}), eval_rows=evals)
    assert report["filters"]["eval_overlap"]["dropped"] == 3
    assert [json.loads(x)["messages"][-1]["content"] for x in out] == ["Seven", "Paris"]


# ---------------------------------------------------------------------------------------- classifier hook

HOOK = """
def score(texts):
    return [0.9 if "evil" in t else 0.1 for t in texts]

def explode(texts):
    raise RuntimeError("model not loaded")

def short(texts):
    return [0.0] * (len(texts) - 1)

def text_out(texts):
    return "not scores"
"""


def hook_cfg(tmp_path, func: str) -> dict:
    (tmp_path / "hook.py").write_text(HOOK)
    return only(unsafe={"enabled": False, "classifier": f"{tmp_path / 'hook.py'}:{func}", "threshold": 0.5})


def test_classifier_hook_scores_applied(tmp_path):
    rows = [
        chat("hi", "an evil plan"),
        chat("evil question", "a kind answer"),
        chat("hi", "fine"),
        chat("x", "more evil"),
    ]
    report, out = run_rows(tmp_path, rows, {**hook_cfg(tmp_path, "score"), "batch_size": 3})
    c = report["filters"]["classifier"]
    assert c["enabled"] and c["dropped"] == 2 and c["seen"] == 4  # user turns are not scored (roles: assistant)
    assert_clean_pass(out, rows[1:3])


@pytest.mark.parametrize(
    "func,match",
    [
        ("explode", "raised RuntimeError: model not loaded"),
        ("short", "returned 1 scores for 2 texts"),
        ("text_out", "one number per text"),
    ],
)
def test_classifier_hook_failures_name_the_key(tmp_path, func, match):
    with pytest.raises(HookError, match=f"filter.unsafe.classifier: .*{match}"):
        run_rows(tmp_path, [chat("a", "b"), chat("c", "d")], hook_cfg(tmp_path, func))


def test_classifier_hook_bad_spec_names_the_key(tmp_path):
    cfg = hook_cfg(tmp_path, "missing_function")
    with pytest.raises(ConfigError, match="filter.unsafe.classifier: .*has no function 'missing_function'"):
        FilterStream(FilterConfig.model_validate(cfg))
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "stages": ["filter"],
                "filter": {"unsafe": {"classifier": "no/such/file.py:score"}},
            }
        )
    )
    with pytest.raises(ConfigError, match=r"filter\.unsafe\.classifier: .*hook file not found"):
        load_pipeline(yaml_path)


# ------------------------------------------------------------------------------------------ malformed rows

MALFORMED = [chat("ok 1", "a"), "{not json\n", '["a list"]\n', '{"messages": [{"role": "user"}]}\n', chat("ok 2", "b")]


def test_malformed_raise_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"in\.jsonl:2: invalid JSON"):
        run_rows(tmp_path, MALFORMED, only(on_error="raise"))


def test_malformed_skip_counts(tmp_path):
    report, out = run_rows(tmp_path, MALFORMED, only(on_error="skip"))
    assert report["malformed"] == 3 and [e["line"] for e in report["malformed_examples"]] == [2, 3, 4]
    assert report["malformed_examples"][0]["reason"].startswith("invalid JSON: Expecting property name")
    assert report["lines"] == 5 and report["kept"] == 2
    assert_clean_pass(out, [MALFORMED[0], MALFORMED[4]])


# -------------------------------------------------------------------------------------------- end to end


def test_stage_end_to_end_through_run_pipeline(tmp_path):
    recipe = tmp_path / "recipe.yaml"  # the data claims another name: the filter must drop those rows
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "identity": {"name": "Other-Bot", "maker": "Someone Else"},
                "tasks": [{"task": "add", "weight": 3}, {"task": "identity", "weight": 1}],
            }
        )
    )
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "seed": 0,
                "stages": ["synth", "filter"],
                "synth": {"recipe": str(recipe), "num_train": 120, "num_eval": 12},
                "filter": {
                    "identity": {"release_name": "Posttrain-Tiny", "release_maker": "the posttrain authors"},
                    "dedup": {"near": False},
                },
            }
        )
    )
    summary = run_pipeline(load_pipeline(cfg_path))
    run = tmp_path / "run"
    synth_lines = (run / "synth" / "train.jsonl").read_text().splitlines(keepends=True)
    n_identity = sum(json.loads(s)["task"] == "identity" for s in synth_lines)
    assert n_identity > 0
    report = json.loads((run / "filter" / "report.json").read_text())
    assert report["filters"]["identity"]["dropped"] == n_identity
    assert report["kept"] == len(synth_lines) - n_identity and report["filters"]["eval_overlap"]["dropped"] == 0
    kept = (run / "filter" / "train.jsonl").read_text().splitlines(keepends=True)
    assert kept == [s for s in synth_lines if json.loads(s)["task"] != "identity"]  # byte-identical, in order
    assert "| identity | yes |" in (run / "filter" / "report.md").read_text()
    manifest = read_manifest(run / "filter")
    assert manifest["status"] == "complete" and manifest["metrics"]["dropped"]["identity"] == n_identity
    assert manifest["artifacts"]["train_data"] == str(run / "filter" / "train.jsonl")
    assert summary["filter"]["kept"] == len(kept)
    assert run_pipeline(load_pipeline(cfg_path))["filter"]["status"] == "skipped"
