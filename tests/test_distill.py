"""distill: the loss wires algos.kd correctly (mask, temperature, top-k), the teacher cache is built once
and reused, mismatched vocabularies are refused, and a short distillation moves the student to the teacher."""

import json

import pytest
import torch

torch.set_num_threads(1)

from safetensors.torch import load_file  # noqa: E402

from posttrain.config import undocumented_fields  # noqa: E402
from posttrain.data import write_jsonl  # noqa: E402
from posttrain.pipeline import load_pipeline, run_pipeline  # noqa: E402
from posttrain.stages.base import StageContext  # noqa: E402

from .conftest import TINY, make_rows, write_pipeline  # noqa: E402

RECIPE = "name: easy\ntasks:\n  - task: sort\n    params: {min_len: 3, max_len: 3}\n  - task: safety\n  - task: count\n"
ARCH = {k: v for k, v in TINY.items() if k != "vocab_size"}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with a different seed and a sharpened output (final norm x30): peaked distributions,
    far from the student's near-uniform ones, so distillation has something to move."""
    from posttrain.models import ModelConfig, build_tiny_model, save_model_dir

    model = build_tiny_model(ModelConfig(family="llama", **TINY), tiny_tokenizer, seed=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    return save_model_dir(model, tiny_tokenizer, tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", make_rows(64, seed=1))
    write_jsonl(folder / "eval.jsonl", make_rows(16, seed=2))
    return folder / "train.jsonl", folder / "eval.jsonl"


def _stage(tmp_path, student, teacher, data_files, **cfg):
    from posttrain.stages.distill import Distill, DistillConfig

    train, evals = data_files
    ctx = StageContext(
        name="distill",
        dir=tmp_path / "distill",
        seed=0,
        inputs={"model": str(student), "teacher": str(teacher), "train_data": str(train), "eval_data": str(evals)},
    )
    stage = Distill(DistillConfig(max_length=64, batch_size=4, eval_samples=0, **cfg), ctx)
    stage.setup()
    return stage


def _hand_loss(stage, examples, kind, temperature, alpha, k=None, beta=0.0):
    """alpha * T^2 * KD + (1 - alpha) * NLL, per position with explicit formulas, over answer tokens only.

    The answer span comes from the prompt's own tokenization (chat_prompt_ids), not from the labels."""
    from posttrain.engines import chat_prompt_ids

    kd_sum, nll_sum, count = 0.0, 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        prompt_len = len(chat_prompt_ids(stage.tokenizer, stage.train_rows[ex["row_id"]]["messages"][:-1]))
        with torch.no_grad():
            s_logits = stage.model(input_ids=ids).logits[0].double()
            t_logits = stage.teacher(input_ids=ids).logits[0].double()
        for t in range(prompt_len - 1, ids.shape[1] - 1):
            p, q = torch.softmax(t_logits[t] / temperature, -1), torch.softmax(s_logits[t] / temperature, -1)
            if kind == "topk":
                top = torch.argsort(p, descending=True)[:k]
                p, q = p[top] / p[top].sum(), q[top]  # teacher renormalised over its top-k, student not
                kd = (p * (p / q).log()).sum()
            elif beta == 0.0:
                kd = (p * (p / q).log()).sum()
            else:
                m = beta * p + (1 - beta) * q
                kd = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
            kd_sum += float(kd)
            nll_sum += -float(torch.log_softmax(s_logits[t], -1)[ids[0, t + 1]])
            count += 1
    return alpha * temperature**2 * kd_sum / count + (1 - alpha) * nll_sum / count


def test_config_fields_documented():
    from posttrain.stages.distill import DistillConfig

    assert undocumented_fields(DistillConfig) == []


def test_labels_are_sfts_assistant_only_labels(tmp_path, tiny_model_dir, teacher_dir, data_files, tiny_tokenizer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    stage = _stage(tmp_path, tiny_model_dir, teacher_dir, data_files)
    rows = stage.train_rows[:6]
    sft = SFTTrainer(
        model=stage.model,
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            assistant_only_loss=True,
            report_to="none",
            use_cpu=True,
            max_length=64,
            shuffle_dataset=False,
        ),
        train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
        processing_class=tiny_tokenizer,
    )
    for ours, theirs, row in zip(stage.train_examples, sft.train_dataset, rows):
        assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
        kept = [t for t in ours["labels"] if t != -100]
        assert tiny_tokenizer.decode(kept) == row["messages"][-1]["content"] + "<end_of_turn>\n"


def test_offline_loss_equals_hand_computed_topk_kl(tmp_path, tiny_model_dir, teacher_dir, data_files):
    stage = _stage(
        tmp_path, tiny_model_dir, teacher_dir, data_files, mode="offline", temperature=2.0, alpha=0.7, top_k=5
    )
    stage._open_cache()
    trainer = stage._trainer()
    examples = [stage.train_examples[i] for i in (0, 3, 5)]  # different lengths: padding is exercised
    batch = trainer.data_collator(examples)
    assert batch["topk_indices"].shape[-1] == 5
    stage.model.train()
    loss = trainer.compute_loss(stage.model, dict(batch))
    expected = _hand_loss(stage, examples, "topk", temperature=2.0, alpha=0.7, k=5)
    assert loss.item() == pytest.approx(expected, abs=5e-3)  # float16 storage of the teacher log-probs
    # the same batch at T=1 is a different number: temperature is really applied
    stage.cfg.temperature = 1.0
    assert abs(float(trainer.compute_loss(stage.model, dict(batch))) - expected) > 0.05


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_online_loss_equals_hand_computed_full_kl_or_jsd(tmp_path, tiny_model_dir, teacher_dir, data_files, beta):
    stage = _stage(
        tmp_path, tiny_model_dir, teacher_dir, data_files, mode="online", temperature=1.5, alpha=0.6, beta=beta
    )
    trainer = stage._trainer()
    examples = [stage.train_examples[i] for i in (1, 2, 7)]
    batch = trainer.data_collator(examples)
    assert "topk_indices" not in batch
    stage.model.train()
    loss = trainer.compute_loss(stage.model, dict(batch))
    expected = _hand_loss(stage, examples, "full", temperature=1.5, alpha=0.6, beta=beta)
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def _pipeline(tmp_path, student, teacher, **distill) -> str:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    distill = {
        "model": str(student),
        "teacher": str(teacher),
        "max_steps": 2,
        "batch_size": 8,
        "max_length": 64,
        "eval_samples": 0,
        **({"top_k": 8} if distill.get("mode", "offline") == "offline" else {}),  # other modes refuse it
        **distill,
    }
    body = (
        f"seed: 0\nstages: [synth, distill]\n"
        f"synth: {{recipe: {tmp_path / 'recipe.yaml'}, num_train: 120, num_eval: 24}}\n"
        f"distill: {json.dumps(distill)}\n"
    )
    return write_pipeline(tmp_path, body)


def test_cache_built_reused_and_rebuilt(tmp_path, tiny_model_dir, teacher_dir):
    from posttrain.distill_cache import TopKCache, tokenize_for_loss
    from posttrain.algos.kd import topk_teacher
    from posttrain.data import read_conversations

    path = _pipeline(tmp_path, tiny_model_dir, teacher_dir, cache_dir=str(tmp_path / "kdcache"))
    first = run_pipeline(load_pipeline(path))["distill"]
    assert first["cache"] == "built"
    cache_file = tmp_path / "kdcache" / first["cache_dir"].split("/")[-1] / "topk.safetensors"
    mtime = cache_file.stat().st_mtime_ns

    again = run_pipeline(load_pipeline(path), only="distill", force=True)["distill"]
    assert again["cache"] == "reused" and again["cache_dir"] == first["cache_dir"]
    assert cache_file.stat().st_mtime_ns == mtime  # not recomputed
    # a training hyperparameter is not part of the key: the runner clears the stage dir, the cache stays
    other_lr = run_pipeline(load_pipeline(path, ["distill.learning_rate=5e-4"]))["distill"]
    assert other_lr["cache"] == "reused" and cache_file.stat().st_mtime_ns == mtime

    new_k = run_pipeline(load_pipeline(path, ["distill.top_k=4"]))["distill"]
    assert new_k["cache"] == "built" and new_k["cache_dir"] != first["cache_dir"]
    small = TopKCache.load(tmp_path / "kdcache" / new_k["cache_dir"].split("/")[-1])
    assert small.indices.shape[1] == 4 and small.indices.dtype == torch.int32 and small.logprobs.dtype == torch.float16

    # stored values = the teacher's top-k at that position, renormalised over the k
    from posttrain.models import load_model, load_tokenizer

    cache = TopKCache.load(cache_file.parent)
    rows = read_conversations(tmp_path / "run" / "synth" / "train.jsonl")
    example = tokenize_for_loss(load_tokenizer(tiny_model_dir), rows[:3])[2]
    positions, indices, logprobs = cache.row(example["row_id"])
    with torch.no_grad():
        logits = load_model(teacher_dir, device="cpu")(input_ids=torch.tensor([example["input_ids"]])).logits[0]
    want_idx, want_lp = topk_teacher(logits[positions[1].long()], 8)
    assert indices[1].tolist() == want_idx.tolist()
    assert torch.allclose(logprobs[1].float(), want_lp, rtol=1e-3, atol=1e-3)  # float16 storage
    assert float(logprobs[1].float().exp().sum()) == pytest.approx(1.0, abs=5e-3)


def test_default_cache_lives_in_stage_dir_and_is_reused_on_rerun(tmp_path, tiny_model_dir, teacher_dir):
    path = _pipeline(tmp_path, tiny_model_dir, teacher_dir)
    first = run_pipeline(load_pipeline(path))["distill"]
    assert first["cache"] == "built"
    assert first["cache_dir"].startswith(str(tmp_path / "run" / "distill" / "teacher_topk"))
    again = run_pipeline(load_pipeline(path), only="distill", force=True)["distill"]
    assert again["cache"] == "reused"


def test_vocabulary_mismatch_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer):
    from posttrain.models import ModelConfig, build_tiny_model, save_model_dir, train_tokenizer

    other_tok = train_tokenizer(
        [m["content"] for r in make_rows(200, seed=9, tasks=("add", "upper")) for m in r["messages"]],
        TINY["vocab_size"],
    )
    other = save_model_dir(
        build_tiny_model(ModelConfig(family="llama", **TINY), other_tok), other_tok, tmp_path / "other_teacher"
    )
    s_by_id = {i: t for t, i in tiny_tokenizer.get_vocab().items()}
    t_by_id = {i: t for t, i in other_tok.get_vocab().items()}
    first = next(i for i in sorted(s_by_id) if s_by_id.get(i) != t_by_id.get(i))
    with pytest.raises(ValueError) as err:
        run_pipeline(load_pipeline(_pipeline(tmp_path, tiny_model_dir, other)))
    msg = str(err.value)
    assert str(tiny_model_dir) in msg and str(other) in msg and "do not share a vocabulary" in msg
    assert repr(s_by_id[first]) in msg


def test_offline_distillation_moves_student_toward_teacher(tmp_path, tiny_model_dir, teacher_dir):
    from posttrain.algos.kd import forward_kl
    from posttrain.distill_cache import pad_batch, tokenize_for_loss
    from posttrain.data import read_conversations
    from posttrain.models import load_model, load_tokenizer

    path = _pipeline(
        tmp_path, tiny_model_dir, teacher_dir, max_steps=30, learning_rate=3e-3, alpha=1.0, top_k=32, eval_steps=15
    )
    m = run_pipeline(load_pipeline(path))["distill"]
    before, after = m["heldout_before"], m["heldout_after"]
    assert after["kl_to_teacher"] < 0.75 * before["kl_to_teacher"], m
    out = tmp_path / "run" / "distill"
    start, final = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in start)
    assert not (out / "model" / "training_args.bin").exists() and not (out / "checkpoints").exists()
    assert (out / "loss.png").stat().st_size > 1000 and "kl_to_teacher" in (out / "report.md").read_text()
    # the reported held-out KL is the algos.kd forward KL of the saved student, recomputed here
    tok = load_tokenizer(out / "model")
    examples = tokenize_for_loss(tok, read_conversations(tmp_path / "run" / "synth" / "eval.jsonl"))
    batch = pad_batch(examples, tok.pad_token_id)
    with torch.no_grad():
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = load_model(out / "model", device="cpu")(**model_inputs).logits
        t = load_model(teacher_dir, device="cpu")(**model_inputs).logits
    kl = forward_kl(s[:, :-1], t[:, :-1], batch["labels"][:, 1:] != -100)
    assert float(kl) == pytest.approx(after["kl_to_teacher"], abs=2e-4)


def test_on_policy_gkd_trains(tmp_path, tiny_model_dir, teacher_dir):
    path = _pipeline(
        tmp_path,
        tiny_model_dir,
        teacher_dir,
        mode="on_policy",
        lmbda=1.0,
        beta=0.5,
        max_steps=3,
        rollout_max_new_tokens=8,
    )
    m = run_pipeline(load_pipeline(path))["distill"]
    assert m["mode"] == "on_policy" and m["steps"] == 3 and "cache" not in m
    start = load_file(tiny_model_dir / "model.safetensors")
    final = load_file(tmp_path / "run" / "distill" / "model" / "model.safetensors")
    assert any(not torch.equal(start[k], final[k]) for k in start)


@pytest.mark.slow
def test_offline_distill_as_two_deepspeed_ranks(tmp_path, tiny_model_dir, teacher_dir):
    """Rank 0 builds the cache, rank 1 loads it; both train one ZeRO-2 job and the KL still falls."""
    path = _pipeline(
        tmp_path,
        tiny_model_dir,
        teacher_dir,
        max_steps=16,
        learning_rate=3e-3,
        alpha=1.0,
        top_k=32,
        distributed={"num_processes": 2, "zero_stage": 2},
    )
    m = run_pipeline(load_pipeline(path))["distill"]
    assert m["processes"] == 2 and m["deepspeed_zero_stage"] == 2 and m["cache"] == "built"
    assert len(list((tmp_path / "run" / "distill" / "teacher_topk").iterdir())) == 1
    assert m["heldout_after"]["kl_to_teacher"] < 0.85 * m["heldout_before"]["kl_to_teacher"], m


def test_top_k_above_the_teachers_vocabulary_is_refused_before_any_stage_runs(tmp_path, tiny_model_dir, teacher_dir):
    from posttrain.config import ConfigError

    path = _pipeline(tmp_path, tiny_model_dir, teacher_dir, top_k=TINY["vocab_size"] + 1)
    with pytest.raises(ConfigError, match=rf"distill\.top_k={TINY['vocab_size'] + 1} is more than the teacher's"):
        run_pipeline(load_pipeline(path))
    assert not (tmp_path / "run" / "synth").exists()  # refused before the first stage
