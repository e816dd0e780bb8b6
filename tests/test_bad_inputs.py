"""A battery of bad inputs through the command line: each one exits non-zero with no traceback, a message that
names the file and line (or row) or the config key at fault, nothing marked complete and nothing half-written.

Each case writes its files into a temp dir and runs `posttrain.cli.main` in this process (the same code path as
the console command, without an interpreter start per case)."""

from __future__ import annotations

import json
import logging
import shutil
import traceback
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.manifest import read_manifest

from .conftest import QUICKSTART_RECIPE, make_rows

CONV = {"messages": [{"role": "user", "content": "Sort these numbers: 3, 1"}, {"role": "assistant", "content": "1, 3"}]}
SFT = "sft: {{model: {model}, train_data: {data}, max_steps: 2, batch_size: 4, eval_samples: 0}}\n"


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _sft_case(data_text: bytes | str, expect: str, name: str = "train.jsonl"):
    def build(d: Path, model: Path) -> str:
        f = d / name
        f.write_bytes(data_text if isinstance(data_text, bytes) else data_text.encode())
        return "stages: [sft]\n" + SFT.format(model=model, data=f)

    return build, expect


def _model_case(make, expect: str):
    def build(d: Path, model: Path) -> str:
        target = make(d, model)
        good = d / "train.jsonl"
        good.write_text(_jsonl([CONV] * 8))
        return "stages: [sft]\n" + SFT.format(model=target, data=good)

    return build, expect


def _copy_model(d: Path, model: Path, name: str) -> Path:
    out = d / name
    shutil.copytree(model, out)
    return out


def _truncated(d, model):
    out = _copy_model(d, model, "truncated")
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    return out


def _pickle_only(d, model):
    out = d / "pickled"
    out.mkdir()
    shutil.copy(model / "config.json", out / "config.json")
    (out / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return out


def _config_only(d, model):
    out = d / "config_only"
    out.mkdir()
    shutil.copy(model / "config.json", out / "config.json")
    return out


def _empty_dir(d, model):
    (d / "empty").mkdir()
    return d / "empty"


def _a_file(d, model):
    (d / "model.txt").write_text("not a model")
    return d / "model.txt"


def _plain(body: str, expect: str, files: dict | None = None):
    """A config body with {d} (the temp dir) and {model} filled in, and extra files to write first."""

    def build(d: Path, model: Path) -> str:
        for rel, text in (files or {}).items():  # written as given
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        (d / "train.jsonl").write_text(_jsonl(make_rows(16)))
        return body.format(d=d, model=model, recipe=QUICKSTART_RECIPE)

    return build, expect


RULE = "def ok(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"


def _ppo(rule: str, fn: str, expect: str, source: str | None = None):
    """ppo with one rule reward `fn` from the file `rule` (relative to the temp dir), holding `source` if given."""

    def build(d: Path, model: Path) -> str:
        if source is not None:
            (d / rule).write_text(source)
        (d / "train.jsonl").write_text(_jsonl(make_rows(16)))
        return (
            f"stages: [ppo]\nppo: {{model: {model}, train_data: {d}/train.jsonl, updates: 1, "
            f"rollout_batch_size: 2, mini_batch_size: 2, eval_samples: 0, "
            f"sampling: {{backend: hf, max_new_tokens: 4, temperature: 1.0}}, "
            f"scoring: {{rules: [{{path: {d / rule}, function: {fn}}}]}}}}\n"
        )

    return build, expect


CASES = {
    # the config file itself
    "unknown top-level key": _plain("stages: [sft]\nsedd: 3\n", r"sedd: unknown key.*pipeline.yaml:3"),
    "unknown stage key": _plain("stages: [sft]\nsft: {{learnin_rate: 0.1}}\n", r"sft.learnin_rate: unknown key"),
    "wrong type": _plain("stages: [sft]\nsft: {{epochs: many}}\n", r"sft.epochs: .*number.*'many'"),
    "infinite learning rate": _plain("stages: [sft]\nsft: {{learning_rate: .inf}}\n", r"sft.learning_rate: .*finite"),
    "nan kl coefficient": _plain("stages: [ppo]\nppo: {{kl_coef: .nan}}\n", r"ppo.kl_coef: .*finite"),
    "zero batch size": _plain(
        "stages: [sft]\nsft: {{batch_size: 0}}\n", r"sft.batch_size: .*greater than or equal to 1"
    ),
    "unknown stage kind": _plain("stages: [sft, rlhf]\n", r"stages.*unknown stage 'rlhf'"),
    "a stage name twice": _plain(
        "stages: [{{name: a, kind: sft}}, {{name: a, kind: sft}}]\n", r"stage name\(s\) listed twice: \['a'\]"
    ),
    "yaml syntax error": _plain("stages: [sft\nsft: {{}}\n", r"pipeline.yaml: not valid YAML"),
    "top level not a mapping": _plain("- sft\n- ppo\n", r"pipeline.yaml: the top level must be a mapping"),
    "run_dir under a file": _plain(
        "run_dir: {d}/afile/run\nstages: [sft]\nsft: {{model: {model}}}\n",
        r"run_dir: .*afile is a file",
        {"afile": "x"},
    ),
    "cuda on a cpu machine": _plain(
        "stages: [sft]\ndevice: cuda\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\n",
        r"device: device 'cuda' was asked for.*no CUDA",
    ),
    "fp16 on cpu": _plain(
        "stages: [sft]\nprecision: fp16\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\n",
        r"precision: fp16 mixed precision needs a CUDA device",
    ),
    "tp does not divide ranks": _plain(
        "stages: [eval]\neval: {{models: {{m: {model}}}, eval_data: {d}/train.jsonl, "
        "distributed: {{num_processes: 2}}, "
        "sampling: {{backend: vllm, tensor_parallel_size: 3}}}}\n",
        r"eval.sampling.tensor_parallel_size=3 does not divide eval.distributed.num_processes=2",
    ),
    "unknown vllm option": _plain(
        "stages: [ppo]\nppo: {{vllm: {{tensor_paralel: 2}}}}\n", r"ppo.vllm.tensor_paralel: unknown key"
    ),
    # model directories
    "model path missing": _model_case(lambda d, m: d / "nowhere", r"sft.model: .*path does not exist"),
    "model is a file": _model_case(_a_file, r"sft.model: .*expected a model directory, found a file"),
    "model dir empty": _model_case(_empty_dir, r"sft.model: .*no config.json.*an empty directory"),
    "model dir pickle only": _model_case(
        _pickle_only, r"sft.model: .*pytorch_model.bin: pickle weights are never loaded"
    ),
    "model dir config only": _model_case(_config_only, r"sft.model: .*no \*.safetensors weights"),
    "model weights truncated": _model_case(_truncated, r"sft.model: .*truncated safetensors file"),
    # recipes and rule files
    "recipe missing": _plain(
        "stages: [synth]\nsynth: {{recipe: {d}/nope.yaml}}\n", r"synth.recipe: .*path does not exist"
    ),
    "recipe is a directory": _plain("stages: [synth]\nsynth: {{recipe: {d}}}\n", r"synth.recipe: .*expected a file"),
    "recipe unknown task": _plain(
        "stages: [synth]\nsynth: {{recipe: {d}/r.yaml}}\n",
        r"r.yaml: unknown task\(s\) \['juggle'\]",
        {"r.yaml": "tasks:\n  - task: juggle\n"},
    ),
    "recipe not yaml": _plain(
        "stages: [synth]\nsynth: {{recipe: {d}/r.yaml}}\n", r"r.yaml: not valid YAML", {"r.yaml": "tasks: [\n"}
    ),
    "rule file missing": _ppo("none.py", "ok", r"ppo.scoring.rules.0: file not found: .*none.py"),
    "rule function missing": _ppo("r.py", "nope", r"ppo.scoring.rules.0: .*r.py defines no function 'nope'", RULE),
    "rule file not python": _ppo("r.py", "ok", r"r.py:1: not valid Python", "def ok(:\n"),
    "eval verifiers file missing": _plain(
        "stages: [eval]\neval: {{models: {{m: {model}}}, eval_data: {d}/train.jsonl, verifiers: {d}/v.py}}\n",
        r"eval.verifiers: .*(not found|does not exist)",
    ),
    # the graph
    "reference typo": _plain(
        "stages: [sft, merge]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\n"
        "merge: {{method: liti, eta: 0.5, base: sft.modle}}\n",
        r"merge.base='sft.modle': no earlier stage produces this artifact",
    ),
    "reference to a later stage": _plain(
        "stages: [merge, sft]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\n"
        "merge: {{models: [sft.model, {model}]}}\n",
        r"merge.models.0='sft.model': stage 'sft' runs after 'merge'",
    ),
    "a later stage's input missing": _plain(
        "stages: [sft, rm]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\n",
        r"stage 'rm' needs input 'prefs_train'",
    ),
    "seed out of range": _plain(
        "seed: -1\nstages: [synth]\nsynth: {{recipe: {recipe}}}\n", r"seed: .*greater than or equal to 0"
    ),
    "dpo with no pair within max_length": _plain(
        "stages: [dpo]\ndpo: {{model: {model}, prefs_train: {d}/p.jsonl, max_length: 8}}\n",
        r"dpo.max_length=8: none of the 1 training pairs fits",
        {
            "p.jsonl": json.dumps(
                {
                    "chosen": CONV["messages"],
                    "rejected": CONV["messages"][:1] + [{"role": "assistant", "content": "no"}],
                }
            )
            + "\n"
        },
    ),
    "rm with no pair within max_length": _plain(
        "stages: [rm]\nrm: {{model: {model}, prefs_train: {d}/p.jsonl, max_length: 8}}\n",
        r"rm.max_length=8: none of the 1 training pairs fits \(the shortest has \d+ tokens\)",
        {
            "p.jsonl": json.dumps(
                {
                    "chosen": CONV["messages"],
                    "rejected": CONV["messages"][:1] + [{"role": "assistant", "content": "no"}],
                }
            )
            + "\n"
        },
    ),
    "sft with no conversation within max_length": _plain(
        "stages: [sft]\nsft: {{model: {model}, train_data: {d}/train.jsonl, max_length: 8}}\n",
        r"sft.max_length=8: none of the 16 training conversations fits",
    ),
    "grpo with greedy samples": _plain(
        "stages: [ppo]\nppo: {{advantage: grpo, sampling: {{n: 4, temperature: 0}}}}\n",
        r"ppo: .*sampling.temperature 0 \(greedy\) makes them one answer",
    ),
    "distill setting of another mode": _plain(
        "stages: [distill]\ndistill: {{mode: online, top_k: 8, lmbda: 0.3}}\n",
        r"distill: .*top_k, lmbda: not read in mode 'online' \(top_k: offline; lmbda: on_policy\)",
    ),
    # DeepSpeed settings that would be ignored, or fail only at the save
    "offload_params without ZeRO-3": _plain(
        "stages: [sft]\nsft: {{model: {model}, train_data: {d}/train.jsonl, "
        "distributed: {{num_processes: 2, offload_params: true}}}}\n",
        r"sft.distributed: .*offload_params needs zero_stage 3",
    ),
    "offload in one process": _plain(
        "stages: [sft]\nsft: {{model: {model}, train_data: {d}/train.jsonl, "
        "distributed: {{offload_optimizer: true}}}}\n",
        r"sft.distributed: .*offload_optimizer: DeepSpeed ZeRO's, so they need num_processes > 1",
    ),
    "ZeRO-3 weights not gathered": _plain(
        "stages: [sft]\nsft: {{model: {model}, train_data: {d}/train.jsonl, "
        "distributed: {{num_processes: 2, zero_stage: 3, gather_16bit_weights_on_save: false}}}}\n",
        r"sft.distributed: .*gather_16bit_weights_on_save: false leaves ZeRO-3's shards unsaved",
    ),
    "merged LoRA from ZeRO-3": _plain(
        "stages: [sft]\nsft: {{model: {model}, train_data: {d}/train.jsonl, lora: {{enabled: true}}, "
        "distributed: {{num_processes: 2, zero_stage: 3}}}}\n",
        r"sft: .*lora.save=merged is not possible from ZeRO-3's sharded weights",
    ),
    # settings of a late stage: refused before the first stage trains (nothing may be complete)
    "merge with too few models": _plain(
        "stages: [sft, merge]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\nmerge: {{method: slerp}}\n",
        r"merge \(method slerp, 1 input\(s\)\): method slerp needs exactly 2 model",
    ),
    "merge lists the latest model again": _plain(
        "stages: [sft, merge]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\nmerge: {{models: [sft.model]}}\n",
        r"merge.models: sft.model is an input twice \(merge.use_latest_model puts the latest model first\)",
    ),
    "merge t for one-model liti": _plain(
        "stages: [sft, merge]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\n"
        "merge: {{method: liti, eta: 0.5, t: 0.9, base: {model}}}\n",
        r"t is only used by liti with two models",
    ),
    "merge shard size": _plain(
        "stages: [sft, merge]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\nmerge: {{max_shard_size: lots}}\n",
        r"merge.max_shard_size: .*expected a size like 500MB",
    ),
    "eval baseline not evaluated": _plain(
        "stages: [sft, eval]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\n"
        "eval: {{eval_data: {d}/train.jsonl, baseline: nope}}\n",
        r"eval.baseline='nope' is not one of the evaluated models \['sft'\]",
    ),
    "release push without a token": _plain(
        "stages: [sft, release]\nsft: {{model: {model}, train_data: {d}/train.jsonl}}\n"
        "release: {{push_to_hub: {{enabled: true, repo_id: a/b, token_env: POSTTRAIN_NO_SUCH_TOKEN}}}}\n",
        r"POSTTRAIN_NO_SUCH_TOKEN \(release.push_to_hub.token_env\) holds no Hub token",
    ),
    # data files
    "data file missing": _plain(
        "stages: [sft]\nsft: {{model: {model}, train_data: {d}/nope.jsonl}}\n", r"sft.train_data: .*does not exist"
    ),
    "data file empty": _sft_case("", r"train.jsonl.*(empty|no rows)"),
    "data file whitespace": _sft_case("\n  \n\t\n", r"train.jsonl.*(empty|no rows)"),
    "invalid json line": _sft_case(_jsonl([CONV]) + "{not json\n", r"train.jsonl:2: .*(invalid JSON|not valid JSON)"),
    "invalid utf-8": _sft_case(_jsonl([CONV]).encode() + b'{"messages": "\xc3\x28"}\n', r"train.jsonl:2.*UTF-8"),
    "row without messages": _sft_case(_jsonl([CONV, {"text": "hello"}]), r"train.jsonl:2"),
    "roles not alternating": _sft_case(
        _jsonl([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]), r"train.jsonl:1"
    ),
    "empty content": _sft_case(
        _jsonl([{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}]),
        r"train.jsonl:1.*empty",
    ),
    "alpaca csv missing output": _sft_case("instruction,input\nsay hi,\n", r"train.csv.*(output|column)", "train.csv"),
    "preference row without rejected": _plain(
        "stages: [rm]\nrm: {{model: {model}, prefs_train: {d}/p.jsonl}}\n",
        r"p.jsonl: no known format has these columns.*preference \(chosen, rejected.*columns found",
        {"p.jsonl": json.dumps({"chosen": CONV["messages"]}) + "\n"},
    ),
    "filter on an empty file": _plain(
        "stages: [filter]\nfilter: {{train_data: {d}/empty.jsonl}}\n",
        r"empty.jsonl.*(empty|no rows)",
        {"empty.jsonl": ""},
    ),
    "filter on a whitespace file": _plain(
        "stages: [filter, sft]\nfilter: {{train_data: {d}/empty.jsonl}}\nsft: {{model: {model}}}\n",
        r"empty.jsonl.*(empty|no rows)",
        {"empty.jsonl": " \n\n"},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_clear_error_and_leaves_nothing_behind(case, tmp_path, tiny_model_dir, capsys, caplog):
    build, expect = CASES[case]
    body = build(tmp_path, Path(tiny_model_dir))
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        body if body.startswith("run_dir:") or body.startswith("- ") else f"run_dir: {tmp_path / 'run'}\n" + body
    )
    caplog.set_level(logging.INFO, logger="posttrain")
    try:
        code = main(["run", str(config)])
    except BaseException:  # anything escaping main() is what a user would see as a traceback
        pytest.fail(f"{case}: an exception escaped the command line:\n{traceback.format_exc()}")
    captured = capsys.readouterr()
    output = captured.out + captured.err + caplog.text
    assert code != 0, f"{case}: exit code 0\n{output[-2000:]}"
    assert "Traceback" not in output, output[-3000:]
    import re

    assert re.search(expect, output, re.S), f"{case}: expected /{expect}/ in:\n{output[-2000:]}"
    run = tmp_path / "run"
    if run.is_dir():
        for manifest in run.glob("*/manifest.json"):
            assert read_manifest(manifest.parent)["status"] != "complete", f"{case}: {manifest.parent.name} complete"
        leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".partial" in p.name]
        assert not leftovers, leftovers
