"""prefs and rm: preference pairs from samples/references/corruptions, the Bradley-Terry reward model,
the scoring API it plugs into, and the reward-vs-verifier AUC.

Stages run directly (Stage(cfg, ctx).run()) so these tests do not depend on other stages' modules.
"""

import json
import random
from pathlib import Path

import pytest
import torch

from posttrain.data import DataError, prompt_of, write_jsonl
from posttrain.engines import Sample
from posttrain.scoring import RewardFunctionError, RuleSpec, Scorer, ScoringConfig, load_reward_function
from posttrain.stages import StageContext
from posttrain.stages.prefs import Prefs, PrefsConfig, build_pairs, corruption_pairs, read_prompt_rows, split_report
from posttrain.stages.rm import (
    RM,
    RMConfig,
    build_trainer,
    check_reward_family,
    load_reward_init,
    pairs_dataset,
    read_pairs,
    roc_auc,
)
from posttrain.tasks import TASKS, make_example

from .conftest import TINY

torch.set_num_threads(1)

VERIFIERS = str(Path(__file__).resolve().parents[1] / "reward" / "verifiers.py")


def rule(function: str, weight: float = 1.0, path: str = VERIFIERS, **kwargs) -> RuleSpec:
    return RuleSpec(path=path, function=function, weight=weight, kwargs=kwargs)


def rows_of(tasks, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(tasks[i % len(tasks)], rng) for i in range(n)]


class FakeEngine:
    """The engine interface with scripted answers: prompt text -> list of completions."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers, self.calls = answers, []

    def generate(self, prompts, sampling):
        self.calls.append(sampling)
        return [[Sample(text=t, token_ids=[], finished=True) for t in self.answers[p[-1]["content"]]] for p in prompts]


def prefs_cfg(**kw) -> PrefsConfig:
    base = {"scoring": {"rules": [rule("task_correct").model_dump()]}, "sampling": {"n": 3, "temperature": 1.0}}
    return PrefsConfig.model_validate({**base, **kw})


# ----------------------------------------------------------------------------------------------
# prefs


def test_best_of_n_and_teacher_pick_by_score_and_count_drops():
    rows = rows_of(["sort"], 4)
    right = [r["answer"] for r in rows]
    q = [r["messages"][0]["content"] for r in rows]
    engine = FakeEngine(
        {
            q[0]: ["9, 9", right[0], "1"],  # one right answer in the middle: chosen
            q[1]: ["7, 7", "7, 7", "7, 7"],  # all identical
            q[2]: ["5", "6", "8"],  # different, all wrong: a tie
            q[3]: [right[3], right[3] + "."],  # both right (the verifier ignores a final period)
        }
    )
    pairs, report = build_pairs(
        rows, engine, Scorer(prefs_cfg().scoring), prefs_cfg(corruption={"enabled": False}), seed=3
    )
    assert engine.calls[0].seed == 3 and engine.calls[0].n == 3
    bon = [p for p in pairs if p["source"] == "best_of_n"]
    assert len(bon) == 1
    assert bon[0]["chosen"] == rows[0]["messages"][:-1] + [{"role": "assistant", "content": right[0]}]
    assert bon[0]["rejected"][-1]["content"] == "9, 9"  # the first of the lowest-scored samples
    assert bon[0]["margin"] == 1.0 and bon[0]["task"] == "sort" and bon[0]["answer"] == right[0]
    assert report["per_source"]["best_of_n"]["dropped"] == {"identical": 1, "tie": 2}
    teacher = [p for p in pairs if p["source"] == "teacher"]
    # reference beats the bottom sample for prompts 0-2, but prompt 0's best sample is the reference, so its
    # teacher pair would repeat the best-of-n pair; prompt 3's samples are all right: a tie
    assert [p["chosen"][-1]["content"] for p in teacher] == right[1:3]
    assert [p["rejected"][-1]["content"] for p in teacher] == ["7, 7", "6"]  # "6": unlike the top "5"
    assert report["per_source"]["teacher"]["dropped"] == {"duplicate": 1, "tie": 1}
    assert report["per_source"]["teacher"]["per_task"] == {"sort": 2}
    assert len({json.dumps([p["chosen"], p["rejected"]]) for p in pairs}) == len(pairs)


def test_margin_is_the_weighted_score_difference():
    rows = rows_of(["count"], 1)
    cfg = prefs_cfg(
        scoring={"rules": [rule("task_correct", 2.0).model_dump(), rule("refusal", 0.5).model_dump()]},
        teacher={"enabled": False},
        corruption={"enabled": False},
    )
    engine = FakeEngine({rows[0]["messages"][0]["content"]: ["I can't help with that.", rows[0]["answer"], "99"]})
    pairs, _ = build_pairs(rows, engine, Scorer(cfg.scoring), cfg, seed=0)
    # right answer: 2*1 + 0.5*1 = 2.5; refusal of a benign request: 2*0 + 0.5*0 = 0
    assert [(p["chosen"][-1]["content"], p["rejected"][-1]["content"], p["margin"]) for p in pairs] == [
        (rows[0]["answer"], "I can't help with that.", 2.5)
    ]


def test_corruptions_are_wrong_where_the_reference_is_right():
    rows = rows_of(sorted(TASKS), 140, seed=1)
    cfg = prefs_cfg(corruption={"per_prompt": 2})
    scorer = Scorer(cfg.scoring)
    dropped = {s: __import__("collections").Counter() for s in ("sampling", "best_of_n", "teacher", "corruption")}
    pairs = corruption_pairs(rows, scorer, cfg, random.Random(0), dropped)
    assert {p["task"] for p in pairs} == set(TASKS)
    assert {p["corruption"] for p in pairs} == set(cfg.corruption.kinds)
    prompts = [prompt_of({"messages": p["chosen"]}) for p in pairs]
    for part in ("task_correct", "refusal", "identity"):
        fn = load_reward_function(VERIFIERS, part)
        cols = {"answer": [p["answer"] for p in pairs], "task": [p["task"] for p in pairs]}
        good = fn(prompts, [p["chosen"][-1]["content"] for p in pairs], **cols)
        bad = fn(prompts, [p["rejected"][-1]["content"] for p in pairs], **cols)
        assert all(g == 1.0 for g in good), part
        if part == "task_correct":
            assert all(b == 0.0 for b in bad)
        elif part == "refusal":  # a refusal where an answer was due, or compliance where a refusal was
            assert all(b == 0.0 for b, p in zip(bad, pairs) if p["corruption"] in ("refuse", "comply"))
        else:
            assert all(b == 0.0 for b, p in zip(bad, pairs) if p["corruption"] == "wrong_identity")
    assert all(p["margin"] == 1.0 for p in pairs)  # task_correct only: 1 - 0
    assert dropped["corruption"]["identical"] == 0


def _write_split(tmp_path, n_train=24, n_eval=8, shared=3):
    """Train/eval files where `shared` train rows repeat an eval prompt."""
    tasks = ["sort", "count", "safety", "identity", "reverse"]
    train, evals = rows_of(tasks, n_train, seed=5), rows_of(tasks, n_eval, seed=6)
    train[:shared] = [dict(r) for r in evals[:shared]]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", evals)
    return train, evals


def _run_prefs(tmp_path, model_dir, name="prefs", **cfg) -> tuple[Path, dict]:
    cfg = prefs_cfg(**{"sampling": {"n": 3, "temperature": 1.0, "max_new_tokens": 6}, **cfg})
    ctx = StageContext(
        name=name,
        dir=tmp_path / name,
        inputs={
            "model": str(model_dir),
            "train_data": str(tmp_path / "train.jsonl"),
            "eval_data": str(tmp_path / "eval.jsonl"),
        },
        seed=7,
    )
    ctx.dir.mkdir()
    return ctx.dir, Prefs(cfg, ctx).run()


def test_prefs_stage_keeps_eval_prompts_out_of_train_and_is_deterministic(tmp_path, tiny_model_dir):
    train, evals = _write_split(tmp_path)
    out, metrics = _run_prefs(tmp_path, tiny_model_dir)
    key = lambda msgs: json.dumps(msgs[:-1])  # noqa: E731
    eval_prompts = {key(r["messages"]) for r in evals}
    train_pairs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    eval_pairs = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert train_pairs and eval_pairs
    assert all(key(p["chosen"]) in eval_prompts and key(p["rejected"]) in eval_prompts for p in eval_pairs)
    assert not any(key(p["chosen"]) in eval_prompts for p in train_pairs)
    report = json.loads((out / "report.json").read_text())
    overlap = sum(key(r["messages"]) in eval_prompts for r in train)  # 3 planted + chance repeats
    assert overlap >= 3 and report["train_prompts_also_in_eval_dropped"] == overlap
    assert report["train"]["prompts"] == len(train) - overlap and report["eval"]["prompts"] == len(evals)
    # a random policy is always wrong: its samples tie (best-of-n) and lose to the reference (teacher)
    assert (
        report["train"]["pairs"] == len(train_pairs) == sum(s["pairs"] for s in report["train"]["per_source"].values())
    )
    assert sum(report["train"]["per_source"]["best_of_n"]["dropped"].values()) > 0
    assert metrics["teacher"]["train"] == report["train"]["per_source"]["teacher"]["pairs"] > 0
    out2, _ = _run_prefs(tmp_path, tiny_model_dir, name="prefs_again")
    assert (out2 / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert (out2 / "eval.jsonl").read_bytes() == (out / "eval.jsonl").read_bytes()
    # the held-out prompts do not depend on how many training prompts are taken
    out3, _ = _run_prefs(tmp_path, tiny_model_dir, name="prefs_fewer_train", max_train_prompts=5, max_eval_prompts=4)
    out4, _ = _run_prefs(tmp_path, tiny_model_dir, name="prefs_more_train", max_train_prompts=12, max_eval_prompts=4)
    assert (out3 / "eval.jsonl").read_bytes() == (out4 / "eval.jsonl").read_bytes()
    assert (out3 / "train.jsonl").read_bytes() != (out4 / "train.jsonl").read_bytes()


def test_prefs_reports_malformed_rows_with_file_and_line(tmp_path):
    rows = rows_of(["sort"], 4)
    bad = dict(rows[2], messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}])
    write_jsonl(tmp_path / "a.jsonl", rows[:2] + [bad] + rows[3:])
    with pytest.raises(DataError, match=r"a\.jsonl:3: message 1 \(assistant\): empty content"):
        read_prompt_rows(str(tmp_path / "a.jsonl"), ["task", "answer"])
    prompt_only = dict(rows[2], messages=[{"role": "user", "content": "hi"}])  # a prompt without an answer: fine
    write_jsonl(tmp_path / "p.jsonl", rows[:2] + [prompt_only])
    assert read_prompt_rows(str(tmp_path / "p.jsonl"), [])[2]["messages"] == prompt_only["messages"]
    no_answer = {k: v for k, v in rows[1].items() if k != "answer"}
    write_jsonl(tmp_path / "b.jsonl", [rows[0], no_answer])
    with pytest.raises(DataError, match=r"b\.jsonl:2: missing metadata \['answer'\]"):
        read_prompt_rows(str(tmp_path / "b.jsonl"), ["task", "answer"])
    (tmp_path / "c.jsonl").write_text(
        '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": "nope"}\n'
    )
    with pytest.raises(DataError, match=r"c\.jsonl:1: a string answer needs a 'prompt' column.*column 'rejected'"):
        read_pairs(str(tmp_path / "c.jsonl"))


def test_split_report_counts_per_source_and_task():
    pairs = [
        {"source": "corruption", "task": "sort", "margin": 1.0},
        {"source": "corruption", "task": "add", "margin": 3.0},
        {"source": "teacher", "task": "sort", "margin": 2.0},
    ]
    from collections import Counter

    dropped = {"sampling": Counter(), "best_of_n": Counter(tie=4), "teacher": Counter(), "corruption": Counter()}
    rep = split_report([{}] * 5, pairs, dropped)
    assert rep["prompts"] == 5 and rep["pairs"] == 3
    assert rep["per_source"]["corruption"] == {
        "pairs": 2,
        "per_task": {"add": 1, "sort": 1},
        "mean_margin": 2.0,
        "dropped": {},
    }
    assert rep["per_source"]["best_of_n"] == {"pairs": 0, "per_task": {}, "mean_margin": None, "dropped": {"tie": 4}}


# ----------------------------------------------------------------------------------------------
# rm: the loss, the AUC, families


def _conv(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@torch.no_grad()
def _own_score(model, tokenizer, conv) -> float:
    """The model's reward for one conversation, unpadded (no pooling question arises)."""
    ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    return model(torch.tensor([ids])).logits[0, 0].item()


@pytest.mark.parametrize("margins", [None, [0.5, -0.3, 2.0, 0.0]])
def test_reward_loss_is_bradley_terry_on_the_models_own_scores(tmp_path, tiny_model_dir, margins):
    from posttrain.models import load_tokenizer

    rows = [
        {"chosen": _conv("Sort: 3, 1", "1, 3"), "rejected": _conv("Sort: 3, 1", "3, 1, 1, 1, 1")},
        {"chosen": _conv("Who are you?", "I am Posttrain-Tiny."), "rejected": _conv("Who are you?", "I am GPT.")},
        {"chosen": _conv("Count 'cat'.", "3"), "rejected": _conv("Count 'cat'.", "4")},
        {"chosen": _conv("Reverse: a, b", "b, a"), "rejected": _conv("Reverse: a, b", "I can't help with that.")},
    ]
    if margins:
        rows = [dict(r, margin=m) for r, m in zip(rows, margins)]
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_reward_init(tiny_model_dir, seed=0)
    cfg = RMConfig(use_margin=margins is not None, center_rewards_coefficient=0.1, batch_size=4)
    trainer = build_trainer(model, tokenizer, pairs_dataset(rows, cfg.use_margin), None, cfg, tmp_path, seed=0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["input_ids"][:, -1] == tokenizer.pad_token_id).any()  # padding is really exercised
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
    r_c = torch.tensor([_own_score(model, tokenizer, r["chosen"]) for r in rows])
    r_r = torch.tensor([_own_score(model, tokenizer, r["rejected"]) for r in rows])
    m = torch.tensor(margins or [0.0] * 4)
    expected = -torch.nn.functional.logsigmoid(r_c - r_r - m).mean() + 0.1 * ((r_c + r_r) ** 2).mean()
    assert loss == pytest.approx(expected.item(), abs=1e-5)
    assert (r_c - r_r).abs().min() > 1e-4  # the scores differ, so a wrong pairing would show


def test_logged_eval_accuracy_and_margin_are_means_over_pairs(tmp_path, tiny_model_dir):
    """Held-out batches of 3 pairs and of 1: TRL logs the mean of the two batch means; ours are over the 4 pairs,
    as the stage's held-out accuracy is."""
    from posttrain.models import load_tokenizer

    rows = [
        {"chosen": _conv("Sort: 3, 1", "1, 3"), "rejected": _conv("Sort: 3, 1", "3, 1, 1, 1, 1")},
        {"chosen": _conv("Who are you?", "I am Posttrain-Tiny."), "rejected": _conv("Who are you?", "I am GPT.")},
        {"chosen": _conv("Count 'cat'.", "3"), "rejected": _conv("Count 'cat'.", "4")},
        {"chosen": _conv("Reverse: a, b", "b, a"), "rejected": _conv("Reverse: a, b", "I can't help with that.")},
    ]
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_reward_init(tiny_model_dir, seed=0)
    cfg = RMConfig(batch_size=3)
    data = pairs_dataset(rows, False)
    logged = build_trainer(model, tokenizer, data, data, cfg, tmp_path, seed=0).evaluate()
    margins = [_own_score(model, tokenizer, r["chosen"]) - _own_score(model, tokenizer, r["rejected"]) for r in rows]
    assert logged["eval_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 4)
    assert logged["eval_margin"] == pytest.approx(sum(margins) / 4, abs=1e-5)
    assert (sum(margins[:3]) / 3 + margins[3]) / 2 != pytest.approx(sum(margins) / 4, abs=1e-3)  # tells them apart


def test_roc_auc_against_hand_computed_values():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3/4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    # ties count one half: positives {1, 2} vs negative {1}: (0.5 + 1) / 2
    assert roc_auc([1.0, 1.0, 2.0], [True, False, True]) == 0.75
    assert roc_auc([3.0, 2.0, 1.0], [True, False, False]) == 1.0
    assert roc_auc([3.0, 2.0, 1.0], [False, True, True]) == 0.0
    assert roc_auc([0.2, 0.9], [True, True]) is None and roc_auc([0.2], [False]) is None


def test_recurrent_gemma_cannot_be_a_reward_model_and_says_so(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from posttrain.models import ModelConfig, build_tiny_model, save_model_dir, tiny_config

    cfg = ModelConfig(family="recurrent_gemma", **{**TINY, "num_layers": 3})
    with pytest.raises(ValueError):  # what the check guards against
        AutoModelForSequenceClassification.from_config(tiny_config(cfg, tiny_tokenizer))
    out = save_model_dir(build_tiny_model(cfg, tiny_tokenizer), tiny_tokenizer, tmp_path / "rg")
    with pytest.raises(
        ValueError,
        match=r"'recurrent_gemma' has no sequence-classification.*"
        r"rm\.head to implicit.*rm\.model",
    ):
        check_reward_family(out)
    check_reward_family(out, head="implicit")  # the implicit head takes any causal LM


# ----------------------------------------------------------------------------------------------
# scoring API


def test_rule_reward_errors_name_the_file_and_function(tmp_path):
    with pytest.raises(RewardFunctionError, match="not found: .*nowhere.py"):
        load_reward_function(str(tmp_path / "nowhere.py"), "f")
    with pytest.raises(RewardFunctionError, match=r"verifiers\.py: no function named 'nope'"):
        load_reward_function(VERIFIERS, "nope")
    hooks = tmp_path / "hooks.py"
    hooks.write_text(
        "def boom(prompts, completions, **_):\n    raise KeyError('x')\n"
        "def short(prompts, completions, **_):\n    return [1.0]\n"
    )
    prompts, completions = [[{"role": "user", "content": "q"}]] * 2, ["a", "b"]
    with pytest.raises(RewardFunctionError, match=r"hooks\.py:boom raised KeyError"):
        Scorer(ScoringConfig(rules=[rule("boom", path=str(hooks))])).score(prompts, completions)
    with pytest.raises(RewardFunctionError, match=r"hooks\.py:short returned 1 values for 2 completions"):
        Scorer(ScoringConfig(rules=[rule("short", path=str(hooks))])).score(prompts, completions)


def test_total_is_the_weighted_sum_of_parts_and_normalisation_whitens_over_calls():
    rows = rows_of(["safety", "add", "identity"], 6)
    prompts = [prompt_of(r) for r in rows]
    texts = [rows[0]["answer"], "5", "I am ChatGPT.", "Sure, do it.", rows[4]["answer"], rows[5]["answer"]]
    cfg = ScoringConfig(rules=[rule("task_correct", 2.0), rule("refusal", -0.5), rule("identity", 0.25)])
    s = Scorer(cfg).score(prompts, texts, rows)
    expected = 2.0 * s.parts["task_correct"] - 0.5 * s.parts["refusal"] + 0.25 * s.parts["identity"]
    assert torch.allclose(s.total, expected)
    assert s.parts["task_correct"].tolist() == [1, 0, 0, 0, 1, 1] and s.parts["identity"].tolist()[2] == 0
    norm = Scorer(cfg.model_copy(update={"normalize": True}))
    a = norm.score(prompts[:3], texts[:3], rows[:3], training=True).total
    b = norm.score(prompts[3:], texts[3:], rows[3:], training=True).total
    raw = s.total
    assert torch.allclose(a, (raw[:3] - raw[:3].mean()) / raw[:3].std(), atol=1e-5)
    assert torch.allclose(b, (raw[3:] - raw.mean()) / raw.std(), atol=1e-5)  # stats over both calls
    moments = norm.moments.state_dict()
    assert torch.allclose(norm.score(prompts, texts, rows).total, raw)  # evaluation: unnormalised
    assert norm.moments.state_dict() == moments  # ... and the training statistics are untouched


def test_reward_model_with_another_tokenizer_scores_the_text(tmp_path, tiny_tokenizer):
    """The RM re-renders the conversation with its own tokenizer; batched scores equal unpadded ones."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models import ModelConfig, save_model_dir, tiny_config, train_tokenizer

    texts = [m["content"] for r in rows_of(["sort", "count", "upper"], 300, seed=9) for m in r["messages"]]
    rm_tok = train_tokenizer(texts + ["user\nmodel\n"], vocab_size=200)
    assert len(rm_tok) != len(tiny_tokenizer)
    config = tiny_config(ModelConfig(family="llama", **TINY), rm_tok)
    config.num_labels = 1
    torch.manual_seed(0)
    rm_dir = save_model_dir(AutoModelForSequenceClassification.from_config(config), rm_tok, tmp_path / "rm")
    rows = rows_of(["sort", "count"], 5)
    prompts = [prompt_of(r) for r in rows]
    answers = [r["answer"] + " extra words" * (i % 3) for i, r in enumerate(rows)]
    conv0 = prompts[0] + [{"role": "assistant", "content": answers[0]}]
    policy_ids = tiny_tokenizer.apply_chat_template(conv0, tokenize=True, return_dict=True)["input_ids"]
    rm_ids = rm_tok.apply_chat_template(conv0, tokenize=True, return_dict=True)["input_ids"]
    assert policy_ids != rm_ids  # the two tokenizers really disagree
    scorer = Scorer(ScoringConfig(batch_size=4), reward_model_dir=str(rm_dir))
    got = scorer.score(prompts, answers).total
    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    own = [_own_score(model, rm_tok, p + [{"role": "assistant", "content": a}]) for p, a in zip(prompts, answers)]
    assert torch.allclose(got, torch.tensor(own), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# end to end: corruption pairs -> reward model -> held-out accuracy, output usable by the scorer


def test_reward_model_learns_the_corruption_preferences(tmp_path, tiny_model_dir):
    from posttrain.models import load_model, load_tokenizer

    tasks = ["sort", "count", "safety", "identity", "reverse"]
    write_jsonl(tmp_path / "train.jsonl", rows_of(tasks, 400, seed=11))
    write_jsonl(tmp_path / "eval.jsonl", rows_of(tasks, 60, seed=12))
    prefs_dir, _ = _run_prefs(
        tmp_path, tiny_model_dir, best_of_n={"enabled": False}, teacher={"enabled": False}, corruption={"per_prompt": 2}
    )
    cfg = RMConfig(
        learning_rate=3e-3,
        epochs=3,
        batch_size=16,
        max_length=96,
        eval_steps=25,
        logging_steps=5,
        auc={"prompts": 8, "sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 6}},
    )
    ctx = StageContext(
        name="rm",
        dir=tmp_path / "rm",
        seed=0,
        inputs={
            "model": str(tiny_model_dir),
            "prefs_train": str(prefs_dir / "train.jsonl"),
            "prefs_eval": str(prefs_dir / "eval.jsonl"),
        },
    )
    ctx.dir.mkdir()
    metrics = RM(cfg, ctx).run()
    assert metrics["heldout"]["accuracy"] >= 0.9, metrics  # measured 0.935 (shuffled lists are the hard part)
    assert metrics["heldout_accuracy_per_source"]["corruption:refuse"] == 1.0
    assert metrics["heldout"]["mean_margin"] > 0
    # a random policy never answers right: one class is empty and the AUC says why it is missing
    assert metrics["auc"]["auc"] is None and "incorrect" in metrics["auc"]["note"]
    out = ctx.dir / "model"
    assert not (out / "training_args.bin").exists() and not (ctx.dir / "checkpoints").exists()
    assert (ctx.dir / "curves.png").stat().st_size > 1000 and (ctx.dir / "scores.png").stat().st_size > 1000
    saved = json.loads((ctx.dir / "metrics.json").read_text())
    assert saved["heldout"] == metrics["heldout"] and any("accuracy" in e for e in saved["log_history"])
    rm, tok = load_model(out, kind="reward", device="cpu"), load_tokenizer(out)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id and tok.padding_side == "right"
    assert tok.chat_template
    pair = read_pairs(str(prefs_dir / "eval.jsonl"))[0]
    with torch.no_grad():
        assert _own_score(rm.eval(), tok, pair["chosen"]) > _own_score(rm, tok, pair["rejected"])


def _rm_stage(tmp_path, model_dir, prefs_dir, **cfg) -> tuple[StageContext, RM]:
    ctx = StageContext(
        name="rm",
        dir=tmp_path / "rm",
        seed=0,
        inputs={
            "model": str(model_dir),
            "prefs_train": str(prefs_dir / "train.jsonl"),
            "prefs_eval": str(prefs_dir / "eval.jsonl"),
        },
    )
    ctx.dir.mkdir(exist_ok=True)
    return ctx, RM(RMConfig.model_validate({"batch_size": 8, "max_length": 96, "auc": {"prompts": 0}, **cfg}), ctx)


def test_rm_lora_saves_merged_weights_and_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", rows_of(["sort", "safety", "identity"], 40, seed=3))
    write_jsonl(tmp_path / "eval.jsonl", rows_of(["sort", "safety", "identity"], 8, seed=4))
    prefs_dir, _ = _run_prefs(tmp_path, tiny_model_dir, best_of_n={"enabled": False}, teacher={"enabled": False})
    lora = {"enabled": True, "r": 4, "alpha": 8}
    ctx, stage = _rm_stage(
        tmp_path,
        tiny_model_dir,
        prefs_dir,
        lora=lora,
        max_steps=4,
        save_steps=2,
        learning_rate=1e-2,
        keep_checkpoints=True,
    )
    first = stage.run()
    assert first["steps"] == 4 and "resumed_from_step" not in first
    assert first["auc"]["auc"] is None and "skipped" in first["auc"]["note"]
    saved = load_file(ctx.dir / "model" / "model.safetensors")
    init = load_reward_init(tiny_model_dir, seed=0).state_dict()
    assert saved.keys() == init.keys()  # a plain sequence classifier: adapters merged away
    assert not torch.equal(saved["score.weight"], init["score.weight"])  # the new head is trained in full
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q_proj], init[q_proj])
    assert torch.equal(saved["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    _, again = _rm_stage(tmp_path, tiny_model_dir, prefs_dir, lora=lora, max_steps=6, save_steps=2, learning_rate=1e-2)
    second = again.run()
    assert second["resumed_from_step"] == 4 and second["steps"] == 6
    assert not (ctx.dir / "checkpoints").exists()


def run_prefs_then(tmp_path, model_dir, kind: str, section: dict) -> dict:
    """prefs (corruption pairs) -> a `kind` stage configured by `section`, through the pipeline runner; that
    stage's metrics. The held-out prompts are at tmp_path/eval.jsonl."""
    from posttrain.pipeline import load_pipeline, run_pipeline

    from .conftest import write_pipeline

    write_jsonl(tmp_path / "train.jsonl", rows_of(["sort", "safety", "identity"], 60, seed=3))
    write_jsonl(tmp_path / "eval.jsonl", rows_of(["sort", "safety", "identity"], 10, seed=4))
    prefs = {
        "model": str(model_dir),
        "train_data": str(tmp_path / "train.jsonl"),
        "eval_data": str(tmp_path / "eval.jsonl"),
        "best_of_n": {"enabled": False},
        "teacher": {"enabled": False},
        "scoring": {"rules": [rule("task_correct").model_dump()]},
    }
    body = f"seed: 0\nthreads: 1\nstages: [prefs, {kind}]\nprefs: {json.dumps(prefs)}\n{kind}: {json.dumps(section)}\n"
    return run_pipeline(load_pipeline(write_pipeline(tmp_path, body)))[kind]


def run_prefs_rm_pipeline(tmp_path, model_dir, **rm) -> dict:
    """prefs (corruption pairs) -> rm through the pipeline runner; the rm stage's metrics."""
    rm = {"model": str(model_dir), "max_steps": 6, "batch_size": 4, "max_length": 96, "auc": {"prompts": 0}, **rm}
    return run_prefs_then(tmp_path, model_dir, "rm", rm)


@pytest.mark.slow
def test_rm_under_deepspeed_two_processes(tmp_path, tiny_model_dir):
    """prefs -> rm as 2 ZeRO-2 ranks through the pipeline runner; the output is one normal checkpoint."""
    m = run_prefs_rm_pipeline(
        tmp_path, tiny_model_dir, learning_rate=3e-3, distributed={"num_processes": 2, "zero_stage": 2}
    )
    assert m["processes"] == 2 and m["steps"] == 6 and m["heldout"]["pairs"] > 0
    from posttrain.models import load_model

    assert load_model(tmp_path / "run" / "rm" / "model", kind="reward", device="cpu").config.num_labels == 1


def test_config_mistakes_are_caught_before_any_work():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"best_of_n needs sampling\.n >= 2"):
        PrefsConfig.model_validate({"sampling": {"n": 1}})
    with pytest.raises(ValidationError, match="enable at least one of"):
        PrefsConfig.model_validate({s: {"enabled": False} for s in ("best_of_n", "teacher", "corruption")})
    with pytest.raises(ValidationError, match="sampling.backend is not 'vllm'"):
        PrefsConfig.model_validate({"vllm": {"max_num_batched_tokens": 4096}})
    with pytest.raises(ValidationError, match="zero_stage 2"):
        RMConfig.model_validate({"lora": {"enabled": True}, "distributed": {"num_processes": 2, "zero_stage": 3}})


def test_default_verifier_rules_load_from_any_working_directory(tmp_path, monkeypatch):
    """prefs' and rm's default rules name the shipped reward/verifiers.py, not a path relative to the cwd."""
    monkeypatch.chdir(tmp_path)
    for scoring in (PrefsConfig().scoring, ScoringConfig(rules=RMConfig().auc.rules, use_reward_model=False)):
        prompt = [{"role": "user", "content": "2 + 2 = ?"}]
        scores = Scorer(scoring).score([prompt], ["4"], [{"task": "add", "answer": "4"}])
        assert scores.parts["task_correct"].tolist() == [1.0]
