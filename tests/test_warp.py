"""warp stage: M PPO runs from one init, SLERP of their task vectors, LITI toward the init, and the
KL-reward table. The merged weights equal the paper's formulas, the runs differ, the table's numbers are
consistent with the formulas it reports, and a re-run skips finished runs."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.engines import HFEngine, SamplingConfig, chat_prompt_ids
from posttrain.models import load_model, load_tokenizer, save_model_dir
from posttrain.pipeline import load_pipeline, run_pipeline
from posttrain.stages.warp import WarpConfig, sequence_kl, slerp_runs
from posttrain.stages.warp_report import choose_eta, line_check

from .conftest import make_rows, write_pipeline

torch.set_num_threads(1)

LENGTH_REWARD = "def longer(prompts, completions, **_):\n    return [len(c) / 10.0 for c in completions]\n"
NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight")
"""Tensors compared against the formulas."""
ETAS = [0.0, 0.5, 1.0]
KL_BUDGET = 1e9  # every eta qualifies: the choice is then the highest reward, recomputed in the test


def _write_pipeline(tmp_path: Path, model_dir) -> str:
    from posttrain.data import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", make_rows(32, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", make_rows(8, seed=2))
    (tmp_path / "reward.py").write_text(LENGTH_REWARD)
    warp = {
        "model": str(model_dir),
        "train_data": str(tmp_path / "train.jsonl"),
        "eval_data": str(tmp_path / "eval.jsonl"),
        "runs": 2,
        "etas": ETAS,
        "eval_prompts": 8,
        "sampling": {"temperature": 1.0, "max_new_tokens": 12, "n": 2},
        "keep_eta_models": True,
        "choose": "max_reward_under_kl",
        "kl_budget": KL_BUDGET,
        "ppo": {
            "sampling": {"backend": "hf", "temperature": 1.0, "max_new_tokens": 12},
            "scoring": {"rules": [{"path": str(tmp_path / "reward.py"), "function": "longer"}]},
            "updates": 2,
            "rollout_batch_size": 8,
            "mini_batch_size": 8,
            "ppo_epochs": 1,
            "learning_rate": 2e-3,
            "save_every": 1,
        },
    }
    return write_pipeline(tmp_path, f"seed: 0\nstages: [warp]\nwarp: {json.dumps(warp)}\n")


@pytest.fixture(scope="module")
def warp_run(tmp_path_factory, tiny_model_dir):
    """One WARP stage run: 2 runs x 2 PPO updates, etas 0 / 0.5 / 1, models kept."""
    tmp = tmp_path_factory.mktemp("warp")
    path = _write_pipeline(tmp, tiny_model_dir)
    summary = run_pipeline(load_pipeline(path))["warp"]
    return {"dir": tmp / "run" / "warp", "pipeline": path, "summary": summary, "init": Path(tiny_model_dir)}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's formula on flattened tensors, written out (angle well away from 0 in these tests)."""
    va, vb = a.double().reshape(-1), b.double().reshape(-1)
    omega = torch.arccos(torch.dot(va, vb) / (va.norm() * vb.norm()))
    assert omega > 0.05, "task vectors nearly parallel: the test would not tell SLERP from LERP"
    out = (torch.sin((1 - t) * omega) * va + torch.sin(t * omega) * vb) / torch.sin(omega)
    return out.reshape(a.shape)


def test_eta_models_are_liti_of_the_slerp_of_task_vectors(warp_run):
    d, init = warp_run["dir"], _weights(warp_run["init"])
    run0, run1 = _weights(d / "runs" / "run-0" / "model"), _weights(d / "runs" / "run-1" / "model")
    eta = {e: _weights(d / "liti" / f"eta-{e:g}") for e in ETAS}
    for name in NAMES:
        assert torch.equal(eta[0.0][name], init[name])  # eta 0: exactly the init
        merged = init[name].double() + _slerp(run0[name] - init[name], run1[name] - init[name], 0.5)
        torch.testing.assert_close(eta[1.0][name].double(), merged, rtol=0, atol=2e-6)
        halfway = init[name].double() + 0.5 * (merged - init[name].double())
        torch.testing.assert_close(eta[0.5][name].double(), halfway, rtol=0, atol=2e-6)
        # SLERP is not plain averaging: the merged task vector is longer than the average of the two
        lerp = 0.5 * (run0[name] - init[name]) + 0.5 * (run1[name] - init[name])
        assert (merged - init[name].double()).norm() > 1.01 * lerp.double().norm()


def test_the_two_runs_differ(warp_run):
    d, init = warp_run["dir"], _weights(warp_run["init"])
    run0, run1 = _weights(d / "runs" / "run-0" / "model"), _weights(d / "runs" / "run-1" / "model")
    for name in NAMES:
        assert (run0[name] - run1[name]).abs().max() > 1e-4
        assert (run0[name] - init[name]).abs().max() > 1e-4
    records = [json.loads((d / "runs" / f"run-{i}" / "run.json").read_text()) for i in (0, 1)]
    assert [r["seed"] for r in records] == [0, 1] and all(r["status"] == "complete" for r in records)
    stats = warp_run["summary"]["task_vectors"]
    assert stats["cosine"][0][0] == pytest.approx(1.0) and abs(stats["cosine"][0][1]) < 0.99
    # the reported norms are the task vectors' norms over every tensor
    norm0 = math.sqrt(sum(((run0[n].double() - init[n].double()) ** 2).sum().item() for n in init))
    assert stats["norms"][0] == pytest.approx(norm0, rel=1e-5)


def test_results_table_plot_and_released_model(warp_run):
    d, summary = warp_run["dir"], warp_run["summary"]
    results = json.loads((d / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["init", "run-0", "run-1", "eta=0", "eta=0.5", "eta=1"]
    assert rows["init"]["kl"] == 0.0  # the init against itself
    same = ("reward", "kl", "accuracy", "length")  # eta 0 = the init, sampled with the same seed
    assert [rows["eta=0"][k] for k in same] == [rows["init"][k] for k in same]
    assert rows["run-0"]["kl"] != 0.0 and rows["run-1"]["kl"] != 0.0
    # the line check is the straight line from the init to the runs' mean point
    init, runs, top = rows["init"], [rows["run-0"], rows["run-1"]], rows["eta=1"]
    k, r = (runs[0]["kl"] + runs[1]["kl"]) / 2, (runs[0]["reward"] + runs[1]["reward"]) / 2
    line = init["reward"] + (r - init["reward"]) * (top["kl"] - init["kl"]) / (k - init["kl"])
    check = summary["line_check"]
    assert check["line_reward"] == pytest.approx(line, abs=1e-5)
    assert check["above_line"] == (top["reward"] >= line) and check["eta"] == 1.0
    assert summary["etas_above_line"] == [e for e in ETAS if rows[f"eta={e:g}"]["margin"] >= 0]
    # released: the highest reward among the etas under the (loose) KL budget
    best = max((rows[f"eta={e:g}"] for e in ETAS), key=lambda x: (x["reward"], -x["eta"]))
    assert summary["chosen_eta"] == best["eta"] == results["chosen_eta"]
    released, evaluated = _weights(d / "model"), _weights(d / "liti" / f"eta-{best['eta']:g}")
    assert all(torch.equal(released[n], evaluated[n]) for n in evaluated)
    assert load_model(d / "model", device="cpu") is not None and load_tokenizer(d / "model").chat_template
    md = (d / "results.md").read_text()
    assert all(f"| {name} |" in md for name in rows) and ("on or above" in md or "BELOW" in md)
    png = (d / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_config_defaults_and_refusals(tiny_model_dir):
    assert WarpConfig().ppo.reference_mode == "ema"  # WARP's EMA anchor unless told otherwise
    assert WarpConfig(ppo={"reference_mode": "fixed"}).ppo.reference_mode == "fixed"
    refused = [
        ({"ppo": {"seed": 3}}, "warp.ppo.seed"),
        ({"ppo": {"model": str(tiny_model_dir)}}, "warp.ppo.model"),
        ({"seeds": [1, 1]}, "warp.seeds"),
        ({"runs": 3, "slerp_t": 0.3}, "warp.slerp_t"),
        ({"eta": 0.3}, "warp.eta"),
        ({"choose": "max_reward_under_kl"}, "warp.kl_budget"),
        ({"kl_budget": 1.0}, "warp.kl_budget"),
        ({"sampling": {"temperature": 0}}, "warp.sampling"),
        ({"ppo": {"distributed": {"num_processes": 2}}}, "num_processes"),
    ]
    for fields, key in refused:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            WarpConfig(**fields)


def test_choose_eta_and_line_check_by_hand():
    liti = [
        {"eta": 0.0, "kl": 0.0, "reward": 1.0},
        {"eta": 0.5, "kl": 2.0, "reward": 3.0},
        {"eta": 1.0, "kl": 6.0, "reward": 3.5},
    ]
    assert choose_eta(liti, "eta", 0.5, None)[0] == 0.5
    assert choose_eta(liti, "max_reward", 0.5, None)[0] == 1.0
    assert choose_eta(liti, "max_reward_under_kl", 0.5, 2.5)[0] == 0.5
    eta, why = choose_eta(liti[1:], "max_reward_under_kl", 0.5, 1.0)
    assert eta == 0.5 and why.startswith("no eta")  # nothing under budget: the lowest KL, said so
    init, runs = {"kl": 0.0, "reward": 1.0}, [{"kl": 4.0, "reward": 2.0}, {"kl": 8.0, "reward": 4.0}]
    check = line_check(init, runs, {"kl": 3.0, "reward": 2.0})  # line: 1 + (3 - 1) * 3 / 6 = 2.0
    assert check["line_reward"] == pytest.approx(2.0) and check["margin"] == pytest.approx(0.0)
    assert check["above_line"] is True  # on the line counts
    assert line_check(init, runs, {"kl": 6.0, "reward": 2.9})["above_line"] is False
    assert line_check(init, [{"kl": 0.0, "reward": 5.0}], {"kl": 0.0, "reward": 1.0})["above_line"] is None


def _perturbed(src: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    model, gen = load_model(src, device="cpu"), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return save_model_dir(model, load_tokenizer(src), out)


def test_iterative_slerp_for_three_runs(tmp_path, tiny_model_dir):
    init = Path(tiny_model_dir)
    runs = [_perturbed(init, tmp_path / f"r{i}", seed=i) for i in range(3)]
    slerp_runs(init, runs, tmp_path / "merged")
    w0, ws, got = _weights(init), [_weights(r) for r in runs], _weights(tmp_path / "merged")
    for name in NAMES:
        d = [w[name].double() - w0[name].double() for w in ws]
        two = _slerp(d[0], d[1], 1 / 2)  # run 2 joins with t = 1/2, run 3 with t = 1/3
        torch.testing.assert_close(got[name].double(), w0[name].double() + _slerp(two, d[2], 1 / 3), rtol=0, atol=2e-6)
    assert not (tmp_path / ".merged.steps").exists()  # intermediate merges are cleaned up


def test_sequence_kl_is_the_sum_of_token_logprob_differences(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    init = load_model(tiny_model_dir, device="cpu").eval()
    other = load_model(_perturbed(Path(tiny_model_dir), tmp_path / "p", 7, 0.05), device="cpu").eval()
    prompts = [r["messages"][:1] for r in make_rows(3, seed=5)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, n=2, seed=0)
    samples = [s for group in HFEngine(other, tok).generate(prompts, sampling) for s in group]
    ids = [chat_prompt_ids(tok, p) for p in prompts for _ in range(2)]
    got = sequence_kl(other, init, ids, samples, tok.pad_token_id, batch_size=4)
    for i, (p, s) in enumerate(zip(ids, samples)):
        seq = torch.tensor([p + s.token_ids])
        with torch.no_grad():
            lp, lq = (m(input_ids=seq).logits[0, :-1].log_softmax(-1) for m in (other, init))
        pos = torch.arange(len(p) - 1, seq.shape[1] - 1)
        want = (lp[pos, seq[0, pos + 1]] - lq[pos, seq[0, pos + 1]]).sum()
        assert got[i].item() == pytest.approx(want.item(), abs=1e-4)
    assert torch.equal(sequence_kl(init, init, ids, samples, tok.pad_token_id), torch.zeros(len(samples)))


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(warp_run):
    """Runs last in this file: it changes the shared run directory."""
    d = warp_run["dir"]
    model0, model1 = (d / "runs" / f"run-{i}" / "model" / "model.safetensors" for i in (0, 1))
    mtime0, mtime1 = model0.stat().st_mtime_ns, model1.stat().st_mtime_ns
    record1 = d / "runs" / "run-1" / "run.json"
    record = json.loads(record1.read_text())
    record1.write_text(json.dumps({**record, "status": "running"}))  # as a crash inside run-1 leaves it
    summary = run_pipeline(load_pipeline(warp_run["pipeline"]), only="warp", force=True)["warp"]
    assert summary["runs_skipped"] == [0]
    assert [r["skipped"] for r in summary["runs"]] == [True, False]
    assert model0.stat().st_mtime_ns == mtime0 and model1.stat().st_mtime_ns != mtime1
    assert json.loads(record1.read_text())["status"] == "complete"


@pytest.mark.slow
def test_vllm_runs_and_evaluation(tmp_path, tiny_model_dir):
    """Both PPO runs sample with in-process vLLM (the first engine must be closed for the second to
    start) and the evaluation swaps each model's weights into one engine."""
    path = _write_pipeline(tmp_path, tiny_model_dir)
    overrides = ["warp.sampling.backend=vllm", "warp.ppo.sampling.backend=vllm", "warp.etas=[0.0,1.0]"]
    summary = run_pipeline(load_pipeline(path, overrides))["warp"]
    for i in (0, 1):  # every update pushed weights into a live vLLM engine (HF rollouts have nothing to sync)
        history = (tmp_path / "run" / "warp" / "runs" / f"run-{i}" / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(h)["time/sync"] > 0 for h in history)
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "warp" / "results.json").read_text())["rows"]}
    assert rows["init"]["kl"] == 0.0 and rows["eta=0"]["reward"] == rows["init"]["reward"]
    # a run's samples come from its own weights: sampled under the init they would give KL ~ 0
    assert rows["run-0"]["kl"] > 0.01 and rows["eta=1"]["kl"] > 0.01
    assert summary["runs_skipped"] == []
