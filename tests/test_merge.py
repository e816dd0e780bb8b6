"""The merge engine and stage: merged weights equal the formulas (computed here with torch on the loaded
state dicts), dtypes kept, outputs load and generate, shards, every refusal, mergekit agreement, the stage."""

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from posttrain.algos import merge as algos
from posttrain.manifest import hash_path
from posttrain.merging import MergeError, merge_models
from posttrain.models import ModelConfig, build_tiny_model, save_model_dir, train_tokenizer
from posttrain.tasks import TASKS, make_example

torch.set_num_threads(1)

TINY = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)


def _texts(seed: int, reverse: bool = False) -> list[str]:
    rng, out = random.Random(seed), ["user\nmodel\n"]
    for i in range(300):
        for m in make_example(sorted(TASKS)[i % len(TASKS)], rng)["messages"]:
            out.append(m["content"][::-1] if reverse else m["content"])
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tiny model dirs: llama seeds 0-2 (fp32), a near copy of seed 0, a bf16 pair, a Gemma 2 pair,
    and the odd ones out used by the refusal tests."""
    root = tmp_path_factory.mktemp("zoo")
    tok = train_tokenizer(_texts(0), 300)
    dirs = {}

    def build(name, tokenizer=tok, seed=0, **kw):
        cfg = ModelConfig(**{"family": "llama", **TINY, **kw})
        dirs[name] = save_model_dir(build_tiny_model(cfg, tokenizer, seed=seed), tokenizer, root / name)

    for s in range(3):
        build(f"m{s}", seed=s)
    build("b0", seed=0, dtype="bfloat16")
    build("b1", seed=1, dtype="bfloat16")
    build("g0", seed=0, family="gemma2")
    build("g1", seed=1, family="gemma2")
    build("wide", seed=1, intermediate_size=96)
    other_tok = train_tokenizer(_texts(1, reverse=True), 300)
    assert len(other_tok) == len(tok)
    build("other_tok", tokenizer=other_tok, seed=1)
    near = {
        k: v + 1e-4 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
        for k, v in load_file(dirs["m0"] / "model.safetensors").items()
    }
    dirs["near"] = _copy_with_weights(dirs["m0"], root / "near", near)
    return dirs


def _copy_with_weights(src: Path, dst: Path, tensors: dict) -> Path:
    shutil.copytree(src, dst)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def sd(path) -> dict:
    """All tensors of a model dir (one file or shards)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merged(tmp_path, method, inputs, **kw):
    recipe = merge_models(method, inputs, tmp_path / "out", **kw)
    return recipe, sd(tmp_path / "out")


def assert_state_close(out: dict, expected: dict, atol=1e-6):
    assert set(out) == set(expected)
    for k in expected:
        assert out[k].dtype == expected[k].dtype, k
        torch.testing.assert_close(out[k].double(), expected[k].double(), atol=atol, rtol=0, msg=k)


def my_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP written out independently: lerp when the vectors are (nearly) parallel."""
    va, vb = a.double().flatten(), b.double().flatten()
    cos = (va @ vb / (va.norm() * vb.norm())).clamp(-1, 1)
    if va.norm() < 1e-8 or vb.norm() < 1e-8 or cos.abs() > 0.9995:
        return ((1 - t) * va + t * vb).reshape(a.shape)
    om = torch.arccos(cos)
    return ((torch.sin((1 - t) * om) * va + torch.sin(t * om) * vb) / torch.sin(om)).reshape(a.shape)


# --- each method equals its formula --------------------------------------------------------------


def test_linear_is_the_normalised_weighted_average(zoo, tmp_path):
    s = [sd(zoo[f"m{i}"]) for i in range(3)]
    recipe, out = merged(tmp_path, "linear", [zoo["m0"], zoo["m1"], zoo["m2"]], weights=[1, 2, 1])
    expected = {k: (s[0][k].double() + 2 * s[1][k].double() + s[2][k].double()) / 4 for k in s[0]}
    assert_state_close(out, {k: v.float() for k, v in expected.items()})
    assert recipe["weights"] == [0.25, 0.5, 0.25] and recipe["backend"] == "streaming"
    assert [m["hash"] for m in recipe["models"]] == [hash_path(zoo[f"m{i}"]) for i in range(3)]
    assert json.loads((tmp_path / "out" / "merge_recipe.json").read_text()) == recipe


def test_ema_follows_the_recursion_oldest_first(zoo, tmp_path):
    s = [sd(zoo[f"m{i}"]) for i in range(3)]
    _, out = merged(tmp_path, "ema", [zoo["m0"], zoo["m1"], zoo["m2"]], ema_rate=0.3)
    expected = {}
    for k in s[0]:
        e = s[0][k].double()
        for i in (1, 2):
            e = 0.7 * e + 0.3 * s[i][k].double()
        expected[k] = e.float()
    assert_state_close(out, expected)


def test_slerp_follows_the_arc(zoo, tmp_path):
    a, b = sd(zoo["m0"]), sd(zoo["m1"])
    _, out = merged(tmp_path, "slerp", [zoo["m0"], zoo["m1"]], t=0.3)
    assert_state_close(out, {k: my_slerp(a[k], b[k], 0.3).float() for k in a}, atol=1e-5)
    q = "model.layers.0.self_attn.q_proj.weight"  # random pair: nearly orthogonal, far from the chord
    assert (out[q] - (0.7 * a[q] + 0.3 * b[q])).abs().max() > 1e-3


def test_slerp_of_a_near_parallel_pair_is_the_lerp(zoo, tmp_path):
    a, b = sd(zoo["m0"]), sd(zoo["near"])
    _, out = merged(tmp_path, "slerp", [zoo["m0"], zoo["near"]], t=0.5)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert_state_close(out, {k: ((a[k].double() + b[k].double()) / 2).float() for k in a})


def test_task_arithmetic_adds_weighted_task_vectors(zoo, tmp_path):
    base, m1, m2 = sd(zoo["m0"]), sd(zoo["m1"]), sd(zoo["m2"])
    recipe, out = merged(tmp_path, "task_arithmetic", [zoo["m1"], zoo["m2"]], base=zoo["m0"], weights=[0.5, 0.3])
    expected = {
        k: (
            base[k].double() + 0.5 * (m1[k].double() - base[k].double()) + 0.3 * (m2[k].double() - base[k].double())
        ).float()
        for k in base
    }
    assert_state_close(out, expected)
    assert recipe["base"]["hash"] == hash_path(zoo["m0"])


def test_liti_interpolates_towards_the_init(zoo, tmp_path):
    init, m1 = sd(zoo["m0"]), sd(zoo["m1"])
    _, out = merged(tmp_path, "liti", [zoo["m1"]], base=zoo["m0"], eta=0.4)
    assert_state_close(out, {k: (init[k].double() + 0.4 * (m1[k].double() - init[k].double())).float() for k in init})


def test_liti_of_two_models_is_warp_slerp_of_task_vectors(zoo, tmp_path):
    init, m1, m2 = sd(zoo["m0"]), sd(zoo["m1"]), sd(zoo["m2"])
    _, out = merged(tmp_path, "liti", [zoo["m1"], zoo["m2"]], base=zoo["m0"], eta=0.6, t=0.5)
    expected = {k: (init[k].double() + 0.6 * my_slerp(m1[k] - init[k], m2[k] - init[k], 0.5)).float() for k in init}
    assert_state_close(out, expected, atol=1e-5)


def test_ties_applies_algos_ties_per_tensor(zoo, tmp_path):
    base, m1, m2 = sd(zoo["m0"]), sd(zoo["m1"]), sd(zoo["m2"])
    _, out = merged(
        tmp_path, "ties", [zoo["m1"], zoo["m2"]], base=zoo["m0"], density=0.3, weights=[1.0, 0.5], scale=0.8
    )
    expected = {k: algos.ties(base[k], [m1[k] - base[k], m2[k] - base[k]], [1.0, 0.5], 0.3, scale=0.8) for k in base}
    assert_state_close(out, expected, atol=1e-6)


def test_dare_drops_and_rescales_reproducibly(zoo, tmp_path):
    base, m1 = sd(zoo["m0"]), sd(zoo["m1"])
    recipe, out = merged(tmp_path, "dare", [zoo["m1"]], base=zoo["m0"], density=0.25, seed=3)
    kept = total = 0
    for k in base:
        tau = (m1[k] - base[k]).double()
        delta = out[k].double() - base[k].double()
        moved = tau != 0
        is_kept = (delta - tau / 0.25).abs() < 1e-5
        is_dropped = delta.abs() < 1e-7
        assert bool((is_kept | is_dropped)[moved].all()), k  # every entry dropped, or kept and scaled by 1/p
        kept, total = kept + int((is_kept & moved).sum()), total + int(moved.sum())
    assert abs(kept / total - 0.25) < 0.02
    again = merge_models("dare", [zoo["m1"]], tmp_path / "again", base=zoo["m0"], density=0.25, seed=3)
    other = merge_models("dare", [zoo["m1"]], tmp_path / "other", base=zoo["m0"], density=0.25, seed=4)
    again_weights = sd(tmp_path / "again")
    assert again_weights.keys() == out.keys() and all(torch.equal(again_weights[k], out[k]) for k in out)
    assert any(not torch.equal(sd(tmp_path / "other")[k], out[k]) for k in out)
    assert recipe["seed"] == 3 and again["seed"] == 3 and other["seed"] == 4


def test_dare_masks_are_independent_across_models(zoo, tmp_path):
    base, m1 = sd(zoo["m0"]), sd(zoo["m1"])
    _, out = merged(tmp_path, "dare", [zoo["m1"], zoo["m1"]], base=zoo["m0"], density=0.5, weights=[0.5, 0.5])
    q = "model.layers.0.mlp.up_proj.weight"
    tau, delta = (m1[q] - base[q]).double(), (out[q] - base[q]).double()
    # each copy kept with p = 0.5 and scaled by 2, weighted 0.5: 0, tau or 2 tau; one of two kept ~ half the time
    one_kept = ((delta - tau).abs() < 1e-6).double().mean()
    both_kept = ((delta - 2 * tau).abs() < 1e-6).double().mean()
    assert abs(one_kept - 0.5) < 0.05 and abs(both_kept - 0.25) < 0.05


def test_bfloat16_inputs_give_bfloat16_outputs(zoo, tmp_path):
    a, b = sd(zoo["b0"]), sd(zoo["b1"])
    assert {v.dtype for v in a.values()} == {torch.bfloat16}
    recipe, out = merged(tmp_path, "linear", [zoo["b0"], zoo["b1"]])
    assert_state_close(out, {k: ((a[k].float() + b[k].float()) / 2).bfloat16() for k in a}, atol=0)
    assert recipe["output_dtypes"] == ["BF16"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dtype_override_casts_and_updates_config(zoo, tmp_path):
    a, b = sd(zoo["m0"]), sd(zoo["m1"])
    _, out = merged(tmp_path, "linear", [zoo["m0"], zoo["m1"]], dtype="bfloat16")
    assert_state_close(out, {k: ((a[k] + b[k]) / 2).bfloat16() for k in a}, atol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


# --- the output is a usable model dir --------------------------------------------------------------


def test_merged_dir_loads_generates_and_keeps_tokenizer(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.chat import END_OF_TURN
    from posttrain.models import load_tokenizer

    _, out = merged(tmp_path, "linear", [zoo["g0"], zoo["g1"]])  # Gemma 2: tied embeddings
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for name, param in model.state_dict().items():  # every weight came from the merge, tied head included
        key = "model.embed_tokens.weight" if name == "lm_head.weight" else name
        assert torch.equal(param, out[key]), name
    for f in ("tokenizer.json", "chat_template.jinja", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (zoo["g0"] / f).read_bytes(), f
    tok = load_tokenizer(tmp_path / "out")
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids(END_OF_TURN) in gen["eos_token_id"]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "add 2 and 3"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    gen_ids = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen_ids.shape[1] > ids.shape[1]


def test_tiny_shard_size_writes_an_index_and_loads(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = merge_models("linear", [zoo["m0"], zoo["m1"]], tmp_path / "sharded", max_shard_size="60KB")
    merge_models("linear", [zoo["m0"], zoo["m1"]], tmp_path / "single")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert recipe["shards"] == len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    for f in shards:
        assert f.endswith(f"-of-{len(shards):05d}.safetensors")
        assert (tmp_path / "sharded" / f).stat().st_size < 60_000 + 70_000  # one tensor may exceed the cap alone
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    single = sd(tmp_path / "single")
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in single.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    for name, param in model.state_dict().items():
        key = "model.embed_tokens.weight" if name == "lm_head.weight" else name
        assert torch.equal(param, single[key]), name


# --- refusals ----------------------------------------------------------------------------------------


def _drop_tensor(src: Path, dst: Path) -> Path:
    tensors = sd(src)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    return _copy_with_weights(src, dst, tensors)


def _missing_shard(src: Path, dst: Path) -> Path:
    merge_models("linear", [src, src], dst, max_shard_size="60KB")
    sorted(dst.glob("*.safetensors"))[1].unlink()
    return dst


@pytest.mark.parametrize(
    "case, message",
    [
        ("architecture", "architecture mismatch"),
        ("names", "tensor names differ"),
        ("shapes", "shape mismatch for model.layers.0.mlp"),
        ("tokenizer", "tokenizer mismatch"),
        ("weights_sum", "sum to 1.1, not 1"),
        ("negative", "negative weights"),
        ("missing_dir", "model directory not found"),
        ("missing_shard", "lists shard(s) that are missing"),
        ("pickle_only", "pickle weights are never loaded"),
        ("slerp_three", "slerp needs exactly 2 model(s), got 3"),
        ("no_base", "task_arithmetic needs a base model"),
        ("unused_base", "linear does not use a base model"),
        ("no_density", "ties needs density"),
        ("unused_t", "t is only used by slerp/liti, not by linear"),
    ],
)
def test_refusals_name_the_problem(zoo, tmp_path, case, message):
    m0, m1 = zoo["m0"], zoo["m1"]
    calls = {
        "architecture": lambda: merge_models("linear", [m0, zoo["g1"]], out),
        "names": lambda: merge_models("linear", [m0, _drop_tensor(m1, tmp_path / "dropped")], out),
        "shapes": lambda: merge_models("linear", [m0, zoo["wide"]], out),
        "tokenizer": lambda: merge_models("linear", [m0, zoo["other_tok"]], out),
        "weights_sum": lambda: merge_models("linear", [m0, m1], out, weights=[0.5, 0.6], normalize=False),
        "negative": lambda: merge_models("linear", [m0, m1], out, weights=[1.5, -0.5]),
        "missing_dir": lambda: merge_models("linear", [m0, tmp_path / "nope"], out),
        "missing_shard": lambda: merge_models("linear", [m0, _missing_shard(m1, tmp_path / "holey")], out),
        "pickle_only": lambda: merge_models("linear", [m0, _pickle_only(m1, tmp_path / "pickled")], out),
        "slerp_three": lambda: merge_models("slerp", [m0, m1, zoo["m2"]], out),
        "no_base": lambda: merge_models("task_arithmetic", [m1], out),
        "unused_base": lambda: merge_models("linear", [m0, m1], out, base=zoo["m2"]),
        "no_density": lambda: merge_models("ties", [m1], out, base=m0),
        "unused_t": lambda: merge_models("linear", [m0, m1], out, t=0.3),
    }
    out = tmp_path / "out"
    with pytest.raises(MergeError) as err:
        calls[case]()
    assert message in str(err.value)
    assert not out.exists()  # nothing half-written


def _pickle_only(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").rename(dst / "pytorch_model.bin")
    return dst


def test_tokenizer_mismatch_can_be_allowed_and_is_recorded(zoo, tmp_path):
    recipe = merge_models("linear", [zoo["m0"], zoo["other_tok"]], tmp_path / "out", allow_tokenizer_mismatch=True)
    assert any("tokenizer mismatch allowed" in w for w in recipe["warnings"])
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (zoo["m0"] / "tokenizer.json").read_bytes()


def test_negative_weights_when_allowed_extrapolate(zoo, tmp_path):
    a, b = sd(zoo["m0"]), sd(zoo["m1"])
    _, out = merged(tmp_path, "linear", [zoo["m0"], zoo["m1"]], weights=[1.5, -0.5], allow_negative_weights=True)
    assert_state_close(out, {k: (1.5 * a[k].double() - 0.5 * b[k].double()).float() for k in a})


# --- inputs: LoRA adapters, checkpoint folders ---------------------------------------------------------


def test_lora_adapter_is_merged_into_its_base_first(zoo, tmp_path):
    from peft import LoraConfig, get_peft_model

    from posttrain.models import load_model

    peft_model = get_peft_model(
        load_model(zoo["m0"], device="cpu"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    )
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    peft_model.peft_config["default"].base_model_name_or_path = str(zoo["m0"])
    peft_model.save_pretrained(tmp_path / "adapter")
    lora = {k: v for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items()}

    recipe, out = merged(tmp_path, "linear", [tmp_path / "adapter", zoo["m1"]])
    base, m1 = sd(zoo["m0"]), sd(zoo["m1"])
    adapted = dict(base)
    for layer in range(2):  # W + (alpha / r) B A on each adapted projection, written out by hand
        pre = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        w = f"model.layers.{layer}.self_attn.q_proj.weight"
        adapted[w] = base[w] + 2.0 * lora[f"{pre}.lora_B.weight"] @ lora[f"{pre}.lora_A.weight"]
    assert_state_close(out, {k: (adapted[k] + m1[k]) / 2 for k in base}, atol=1e-6)
    assert recipe["models"][0]["kind"].startswith("lora_adapter")
    assert not list(tmp_path.glob(".out.adapters.*"))  # the temporary merged copy is gone


def test_ema_over_a_folder_of_checkpoints_goes_oldest_first(zoo, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zoo["m1"], run / "checkpoint-2")
    shutil.copytree(zoo["m2"], run / "checkpoint-10")
    (run / "checkpoint-20").mkdir()  # an unfinished checkpoint (no weights yet) is skipped
    recipe, out = merged(tmp_path, "ema", [run], ema_rate=0.5)
    m1, m2 = sd(zoo["m1"]), sd(zoo["m2"])
    assert [Path(m["path"]).name for m in recipe["models"]] == ["checkpoint-2", "checkpoint-10"]
    assert_state_close(out, {k: ((m1[k].double() + m2[k].double()) / 2).float() for k in m1})


# --- mergekit backend ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, method, kw",
    [
        ("m", "linear", {"weights": [0.3, 0.7]}),
        ("g", "linear", {"weights": [0.3, 0.7]}),
        ("m", "slerp", {"t": 0.3}),
        ("g", "slerp", {"t": 0.3}),
        ("m", "task_arithmetic", {"base": "m2", "weights": [0.6, 0.4]}),
    ],
)
def test_mergekit_backend_equals_ours(zoo, tmp_path, family, method, kw):
    """Llama and Gemma 2 (tied embeddings) through mergekit give our numbers, config and tensor set."""
    pytest.importorskip("mergekit")
    kw = {**kw, "base": zoo[kw["base"]]} if "base" in kw else kw
    ins = [zoo[f"{family}0"], zoo[f"{family}1"]]
    ours = merge_models(method, ins, tmp_path / "ours", **kw)
    theirs = merge_models(method, ins, tmp_path / "mk", backend="mergekit", **kw)
    assert (ours["backend"], theirs["backend"]) == ("streaming", "mergekit")
    a, b = sd(tmp_path / "ours"), sd(tmp_path / "mk")
    assert_state_close(b, a, atol=1e-6)
    assert (tmp_path / "mk" / "config.json").read_bytes() == (tmp_path / "ours" / "config.json").read_bytes()


def test_auto_backend_uses_mergekit_only_where_it_is_identical(zoo, tmp_path):
    pytest.importorskip("mergekit")
    assert merge_models("linear", [zoo["m0"], zoo["m1"]], tmp_path / "a", backend="auto")["backend"] == "mergekit"
    assert (
        merge_models("ema", [zoo["m0"], zoo["m1"]], tmp_path / "b", backend="auto", ema_rate=0.1)["backend"]
        == "streaming"
    )
    with pytest.raises(MergeError, match="backend mergekit cannot do liti"):
        merge_models("liti", [zoo["m1"]], tmp_path / "c", base=zoo["m0"], eta=0.5, backend="mergekit")


# --- the stage ------------------------------------------------------------------------------------------


def _pipeline(tmp_path, merge: dict, stages=("merge",), **top):
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 0, "stages": list(stages), "merge": merge, **top}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_stage_runs_in_the_pipeline_and_is_skipped_when_unchanged(zoo, tmp_path):
    from posttrain.manifest import read_manifest
    from posttrain.pipeline import load_pipeline, run_pipeline

    path = _pipeline(tmp_path, {"models": [str(zoo["m0"]), str(zoo["m1"])], "weights": [0.25, 0.75]})
    summary = run_pipeline(load_pipeline(path))
    assert summary["merge"]["status"] == "ran" and summary["merge"]["method"] == "linear"
    a, b = sd(zoo["m0"]), sd(zoo["m1"])
    assert_state_close(
        sd(tmp_path / "run" / "merge" / "model"), {k: (0.25 * a[k].double() + 0.75 * b[k].double()).float() for k in a}
    )
    manifest = read_manifest(tmp_path / "run" / "merge")
    assert manifest["metrics"]["models"][1]["hash"] == hash_path(zoo["m1"])
    assert manifest["artifacts"]["model"] == str(tmp_path / "run" / "merge" / "model")
    assert run_pipeline(load_pipeline(path))["merge"]["status"] == "skipped"


def test_stage_resolves_artifact_references_and_the_latest_model(zoo, tmp_path):
    from posttrain.pipeline import load_pipeline, run_pipeline

    # base stage with base.path: its model artifact is m1 (the latest model); merge uses it as the base
    path = _pipeline(
        tmp_path,
        {
            "method": "task_arithmetic",
            "base": "base.model",
            "use_latest_model": False,
            "models": [str(zoo["m0"])],
            "weights": [0.5],
        },
        stages=("base", "merge"),
        base={"path": str(zoo["m1"])},
    )
    summary = run_pipeline(load_pipeline(path))
    assert summary["merge"]["base"]["path"] == str(zoo["m1"].resolve())
    a, b = sd(zoo["m0"]), sd(zoo["m1"])
    assert_state_close(
        sd(tmp_path / "run" / "merge" / "model"),
        {k: (b[k].double() + 0.5 * (a[k].double() - b[k].double())).float() for k in a},
    )
    # default: the latest model first, then the listed ones
    path = _pipeline(tmp_path, {"models": [str(zoo["m2"])]}, stages=("base", "merge"), base={"path": str(zoo["m1"])})
    summary = run_pipeline(load_pipeline(path))
    assert [m["path"] for m in summary["merge"]["models"]] == [str(zoo["m1"].resolve()), str(zoo["m2"].resolve())]


def test_stage_reference_to_a_stage_that_has_not_run_is_refused(zoo, tmp_path):
    from posttrain.pipeline import load_pipeline, run_pipeline

    path = _pipeline(tmp_path, {"models": [str(zoo["m0"]), "sft.model"]})
    # refused before any work: the runner checks every reference against the stages before it
    with pytest.raises(ValueError, match=r"merge.models.1='sft.model': no earlier stage produces this artifact"):
        run_pipeline(load_pipeline(path))
    assert not (tmp_path / "run" / "merge").exists()


def test_config_refuses_a_path_that_is_neither_file_nor_reference(tmp_path):
    from posttrain.config import ConfigError
    from posttrain.pipeline import load_pipeline

    path = _pipeline(tmp_path, {"models": [str(tmp_path / "missing" / "dir")]})
    with pytest.raises(ConfigError, match=r"merge.models.0: .*neither an existing path nor an artifact reference"):
        load_pipeline(path)


def test_cli_merge_command(zoo, tmp_path, capsys):
    from posttrain.cli import main

    path = _pipeline(tmp_path, {"method": "slerp", "models": [str(zoo["m0"]), str(zoo["m1"])], "t": 0.5})
    assert main(["merge", str(path)]) == 0
    recipe = json.loads((tmp_path / "run" / "merge" / "model" / "merge_recipe.json").read_text())
    assert recipe["method"] == "slerp" and recipe["t"] == 0.5


# --- inputs checked before any merging: whole weights, models counted after checkpoint folders expand ----------


def _truncated(src: Path, dst: Path, size: int = 20_000) -> Path:
    """A copy of a model dir whose weights were cut short, as by an interrupted copy."""
    shutil.copytree(src, dst)
    with open(dst / "model.safetensors", "r+b") as f:
        f.truncate(size)
    return dst


def _bad_header(src: Path, dst: Path) -> Path:
    """A copy whose safetensors file is long enough for its header but whose header safetensors rejects."""
    shutil.copytree(src, dst)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    (dst / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    return dst


def _checkpoints(root: Path, steps: dict) -> Path:
    """A training output folder: checkpoint-<step> copies of the given model dirs."""
    for step, src in steps.items():
        shutil.copytree(src, root / f"checkpoint-{step}")
    return root


@pytest.mark.parametrize(
    "make, message",
    [(_truncated, "truncated safetensors file: 20000 bytes, its header needs"), (_bad_header, "cannot read")],
)
def test_unreadable_weights_are_refused_naming_the_file(zoo, tmp_path, make, message):
    bad = make(zoo["m1"], tmp_path / "bad")
    with pytest.raises(MergeError) as err:
        merge_models("linear", [zoo["m0"], bad], tmp_path / "out")
    assert f"{bad / 'model.safetensors'}: " in str(err.value) and message in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["models", "base"])
def test_stage_refuses_weights_cut_short_before_any_stage_runs(zoo, tmp_path, key):
    from posttrain.config import ConfigError
    from posttrain.pipeline import load_pipeline, run_pipeline

    copy = tmp_path / "copy"
    shutil.copytree(zoo["m1"], copy)
    merge = (
        {"models": [str(zoo["m0"]), str(copy)]}
        if key == "models"
        else {"method": "task_arithmetic", "models": [str(zoo["m0"])], "base": str(copy)}
    )
    cfg = load_pipeline(_pipeline(tmp_path, merge))
    with open(copy / "model.safetensors", "r+b") as f:  # cut after the config was read: the plan check sees it
        f.truncate(20_000)
    label = "merge.models.1" if key == "models" else "merge.base"
    file = re.escape(str(copy / "model.safetensors"))
    with pytest.raises(ConfigError, match=rf"{label}: {file}: truncated safetensors file: 20000 bytes, its header"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "merge").exists()


def test_stage_refuses_a_checkpoint_cut_short_in_a_folder(zoo, tmp_path):
    from posttrain.config import ConfigError
    from posttrain.pipeline import load_pipeline, run_pipeline

    folder = _checkpoints(tmp_path / "ckpts", {50: zoo["m1"]})
    _truncated(zoo["m2"], folder / "checkpoint-57")
    path = _pipeline(tmp_path, {"method": "ema", "ema_rate": 0.5, "models": [str(folder)]})
    with pytest.raises(ConfigError, match=r"merge.models.0: .*checkpoint-57/model.safetensors: truncated safetensors"):
        run_pipeline(load_pipeline(path))
    assert not (tmp_path / "run" / "merge").exists()


@pytest.mark.parametrize("method, kw", [("ema", {"ema_rate": 0.5}), ("linear", {})])
def test_stage_averages_a_checkpoint_folder_oldest_first(zoo, tmp_path, method, kw):
    from posttrain.pipeline import load_pipeline, run_pipeline

    folder = _checkpoints(tmp_path / "ckpts", {57: zoo["m2"], 50: zoo["m1"]})
    path = _pipeline(tmp_path, {"method": method, "use_latest_model": False, "models": [str(folder)], **kw})
    summary = run_pipeline(load_pipeline(path))
    assert [Path(m["path"]).name for m in summary["merge"]["models"]] == ["checkpoint-50", "checkpoint-57"]
    a, b = sd(zoo["m1"]), sd(zoo["m2"])
    assert_state_close(
        sd(tmp_path / "run" / "merge" / "model"), {k: ((a[k].double() + b[k].double()) / 2).float() for k in a}
    )


def test_too_few_models_says_what_each_checkpoint_folder_held(zoo, tmp_path):
    from posttrain.config import ConfigError
    from posttrain.pipeline import load_pipeline, run_pipeline

    folder = _checkpoints(tmp_path / "ckpts", {57: zoo["m1"]})
    held = (
        f"(method ema, 1 input(s)): method ema needs at least 2 model(s), got 1 ({folder} holds 1 checkpoint dir(s): "
    )
    with pytest.raises(ConfigError, match=re.escape(held + "checkpoint-57)")):
        run_pipeline(load_pipeline(_pipeline(tmp_path, {"method": "ema", "ema_rate": 0.5, "models": [str(folder)]})))
    with pytest.raises(MergeError, match=r"got 1 \(.* holds 1 checkpoint dir\(s\): checkpoint-57\)"):
        merge_models("ema", [folder], tmp_path / "out", ema_rate=0.5)
    three = _checkpoints(tmp_path / "three", {1: zoo["m0"], 2: zoo["m1"], 3: zoo["m2"]})
    with pytest.raises(MergeError, match=r"slerp needs exactly 2 model\(s\), got 3 \(.* holds 3 checkpoint dir\(s\)"):
        merge_models("slerp", [three], tmp_path / "out")


def test_stage_refuses_a_checkpoint_listed_also_inside_its_folder(zoo, tmp_path):
    from posttrain.config import ConfigError
    from posttrain.pipeline import load_pipeline, run_pipeline

    folder = _checkpoints(tmp_path / "ckpts", {50: zoo["m1"], 57: zoo["m2"]})
    path = _pipeline(tmp_path, {"models": [str(folder), str(folder / "checkpoint-50")]})
    with pytest.raises(ConfigError, match=r"merge.models: .*checkpoint-50 is an input twice"):
        run_pipeline(load_pipeline(path))
