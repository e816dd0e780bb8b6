"""Run lineage and the release model card.

Everything here is read from what a run directory records: each stage's manifest (status, config hash,
fingerprint, seconds, metrics, artifacts), the synth data card and recipe, the filter report and the
eval results. `render_model_card` turns that into a Hugging Face model card: README.md with a YAML
metadata header. Artifact references like `sft.model` are resolved against the same manifests (the
eval and release stages both accept them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml

from .manifest import read_manifest

MODEL_STAGES = ("sft", "distill", "dpo", "ppo", "warp", "merge")
"""Stage kinds whose `model` artifact is a trained policy (what eval compares by default)."""


def completed_models(artifacts: dict, kinds: dict) -> dict[str, str]:
    """Instance name -> model path of every earlier instance of a MODEL_STAGES kind that finished."""
    return {
        name: artifacts[f"{name}.model"]
        for name, kind in kinds.items()
        if kind in MODEL_STAGES and f"{name}.model" in artifacts
    }


def recipe_identity(pipeline: Any, before: Optional[str] = None, lineage: Sequence[str] = ()) -> dict:
    """The release identity (name, maker) of a synth instance's recipe, or {} when none names one: every reader
    of the identity (eval's release_name, release's card title) goes through here.

    A synth instance may have any name (`{name: data, kind: synth}` keeps its recipe in section `data`, not
    `synth`). When several name an identity, the rule is: the last synth in `lineage` (the instances the released
    or evaluated model descends from), since that data taught the model who it is; failing that, the last synth
    before the stage `before` (None: of the whole pipeline, for a caller that does not say which stage it is)."""
    pairs = pipeline.instances() if hasattr(pipeline, "instances") else []
    order, synths = [name for name, _ in pairs], [name for name, kind in pairs if kind == "synth"]
    if before in order:  # a stage not listed (`posttrain release CONFIG`) runs after all of them
        synths = [name for name in synths if order.index(name) < order.index(before)]
    ancestors = [name for name in synths if name in lineage]
    for name in reversed(ancestors or synths):
        identity = _identity_in(getattr(getattr(pipeline, name, None), "recipe", None))
        if identity:
            return identity
    return {}


def _identity_in(recipe: Optional[str]) -> dict:
    """The `identity` mapping of a recipe file ({} when the file or the mapping is missing or unreadable)."""
    if not recipe or not Path(recipe).is_file():
        return {}
    try:
        data = yaml.safe_load(Path(recipe).read_text()) or {}
    except yaml.YAMLError:
        return {}
    identity = data.get("identity") if isinstance(data, dict) else None
    return dict(identity) if isinstance(identity, dict) else {}


# ----------------------------------------------------------------------------------------------
# Lineage


def key_metrics(metrics: dict) -> dict:
    """Every scalar metric, nested keys dotted (accuracy_after.overall), headline ones first: by depth, a
    breakdown's `overall` counting as its parent (so accuracy_after.overall comes before its per-task
    values). The card shows the first few."""
    flat: dict = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            if prefix in ("device", "precision"):  # columns of their own
                return
            if not (isinstance(value, str) and (len(value) > 60 or Path(value).is_absolute())):
                flat[prefix] = round(value, 4) if isinstance(value, float) else value

    visit("", metrics or {})
    depth = {k: k.count(".") - k.endswith(".overall") for k in flat}
    return {k: flat[k] for k in sorted(flat, key=depth.__getitem__)}  # sorted() is stable: same depth, same order


def relative_to_run(path: str | Path, run_dir: str | Path) -> str:
    """`path` as the card shows it: relative to the run directory when inside it, else only its last part
    (a card never carries the training machine's absolute paths)."""
    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return f"{path.name} (outside the run directory)"


def lineage_of(run_dir: str | Path, model_path: str | Path, artifacts: dict) -> list[str]:
    """The instances the model at `model_path` descends from, in pipeline order: the one that made it, the ones
    whose artifacts that one read, and so on back. What an instance read is what the runner resolved for it: its
    manifest's `inputs` (default inputs: the latest earlier producer) and its resolved config.yaml (references
    NAME.ARTIFACT and paths, e.g. merge.models). `artifacts`: NAME.KIND -> path of the earlier finished instances
    (StageContext.artifacts), so no instance after the asking stage, or not run, is ever part of it."""
    run_dir, names = Path(run_dir), list(dict.fromkeys(key.split(".")[0] for key in artifacts))
    roots = [(_resolved(path), key.split(".")[0]) for key, path in artifacts.items()]
    roots += [(_resolved(run_dir / name), name) for name in names]  # anything else an instance keeps in NAME/
    found: set[str] = set()
    todo = [str(model_path)]
    while todo:
        owner = _owner(_resolved(todo.pop()), roots)
        if owner and owner not in found:
            found.add(owner)
            todo += _inputs_read(run_dir / owner)
    return [name for name in names if name in found]


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _owner(path: Path, roots: list[tuple[Path, str]]) -> Optional[str]:
    """The instance whose artifact is, or holds, `path` (artifacts first: a base read in place owns its source
    directory, outside the run directory); None for anything else."""
    return next((name for root, name in roots if path == root or root in path.parents), None)


def _inputs_read(stage_dir: Path) -> list[str]:
    """The path-like strings of a finished instance's manifest inputs and resolved config.yaml."""
    inputs = (read_manifest(stage_dir) or {}).get("inputs") or {}
    try:
        config = yaml.safe_load((stage_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        config = None
    return [s for s in _strings([inputs, config]) if os.sep in s and len(s) < 4096]


def _strings(tree) -> Iterator[str]:
    """Every string in a YAML/JSON tree; a data source handed on as JSON (a mapping or mixture) is opened."""
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            yield from _strings(item)
    elif isinstance(tree, str) and tree.startswith(("{", "[")):
        try:
            yield from _strings(json.loads(tree))
        except ValueError:
            yield tree
    elif isinstance(tree, str):
        yield tree


def evaluation_of(model_path: str | Path, results: dict[str, str]) -> Optional[tuple[str, str]]:
    """(eval instance, the name it gave the model) of the last of `results` (eval instance -> its results.json,
    in pipeline order) that evaluated the model at `model_path`, or None. results.json records the path of every
    model an eval answered with; a table of other models, or from an eval after the release, says nothing of it."""
    target = _resolved(model_path)
    for name, path in reversed(list(results.items())):
        models = (_read_json(Path(path)) or {}).get("models") or {}
        for entry, result in models.items():
            if isinstance(result, dict) and result.get("path") and _resolved(result["path"]) == target:
                return name, entry
    return None


def read_lineage(run_dir: str | Path, stages: list[str]) -> list[dict]:
    """One record per stage of `stages` that has a manifest: name, status, hashes, seconds, metrics, and the
    device and precision it computed with (the stages that compute record them)."""
    records = []
    for name in stages:
        m = read_manifest(Path(run_dir) / name)
        if m is None:
            continue
        metrics = m.get("metrics") or {}
        records.append(
            {
                "stage": name,
                "kind": m.get("kind"),
                "status": m.get("status"),
                "config_hash": m.get("config_hash"),
                "fingerprint": m.get("fingerprint"),
                "seconds": m.get("seconds"),
                "metrics": metrics,
                "device": m.get("device"),
                "precision": m.get("precision"),
            }
        )
    return records


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _first_instance(kinds: Optional[dict], kind: str) -> Optional[str]:
    """The first instance of `kind` in `kinds` (instance name -> kind; None: the plain kind names); None when
    `kinds` has none (a release of a model from outside the run has no data of the run in its lineage)."""
    if kinds is None:
        return kind
    return next((name for name, k in kinds.items() if k == kind), None)


def base_of(run_dir: str | Path, model_path: str | Path, kinds: Optional[dict]) -> Optional[str]:
    """The base instance the model at `model_path` descends from, following each stage's `model` input in
    the manifests (a recipe may have several bases: a teacher's and a student's); None when the chain leaves
    the run directory before reaching one."""
    run_dir = Path(run_dir).resolve()
    base_models: dict[Path, str] = {}  # built here: NAME/model; read in place (base.path): its source path
    for name in [name for name, kind in ({"base": "base"} if kinds is None else kinds).items() if kind == "base"]:
        source = ((read_manifest(run_dir / name) or {}).get("metrics") or {}).get("source")
        base_models.update({**({Path(source).resolve(): name} if source else {}), run_dir / name / "model": name})
    path, seen = Path(model_path).resolve(), set()
    while path not in seen:
        seen.add(path)
        if path in base_models:
            return base_models[path]
        try:
            stage = path.relative_to(run_dir).parts[0]
        except (ValueError, IndexError):
            return None
        made_from = ((read_manifest(run_dir / stage) or {}).get("inputs") or {}).get("model")
        if not made_from:
            return None
        path = Path(made_from).resolve()
    return None


def data_summary(
    run_dir: str | Path, pipeline: Any, kinds: Optional[dict] = None, model_path: Optional[str | Path] = None
) -> list[str]:
    """Markdown bullet lines: the base model `model_path` descends from (when the manifests tell), data recipe
    and card counts, filter report totals (of the first instance of each of those kinds; `kinds`: instance
    name -> kind, default: the plain kind names)."""
    run_dir, lines = Path(run_dir), []
    base_name = base_of(run_dir, model_path, kinds) if model_path else _first_instance(kinds, "base")
    base = read_manifest(run_dir / base_name) if base_name else None
    if base and base.get("status") == "complete":
        m = base.get("metrics") or {}
        source = m.get("source", "unknown")
        source = relative_to_run(source, run_dir) if Path(source).is_absolute() else source
        lines.append(
            f"- Base model: {source}"
            + (f" ({m['architecture']}, {m['parameters']:,} parameters)" if "parameters" in m else "")
        )
    synth = _first_instance(kinds, "synth")
    card = _read_json(run_dir / synth / "card.json") if synth else None
    if card and "prompt_counts" in card:  # synth from the user's own prompts, answered by a teacher
        counts, teacher = card["prompt_counts"], card["teacher"]
        lines.append(
            f"- Data: your own prompts ({counts['read']} read, {counts['duplicates_dropped']} duplicates "
            f"dropped) answered by the teacher `{Path(str(teacher['model'])).name}` "
            f"({teacher['unfinished']} answers unfinished); {card['train']['rows']} train rows, "
            f"{card['eval']['rows']} held-out rows"
        )
    elif card:
        recipe = getattr(getattr(pipeline, synth, None), "recipe", None)
        per_task = ", ".join(f"{t} {n}" for t, n in sorted(card["train"]["per_task"].items()))
        lines.append(
            f"- Data: synthetic recipe `{card.get('recipe')}`"
            + (f" ({Path(recipe).name})" if recipe else "")
            + f"; {card['train']['rows']} train rows ({per_task}), {card['eval']['rows']} held-out rows"
        )
    filtered = _first_instance(kinds, "filter")
    report = _read_json(run_dir / filtered / "report.json") if filtered else None
    if report:
        dropped = ", ".join(f"{n} {f['dropped']}" for n, f in report.get("filters", {}).items() if f.get("dropped"))
        lines.append(
            f"- Filtering: {report['rows']} rows in, {report['kept']} kept ({report['changed']} changed), "
            f"{report['dropped']} dropped" + (f" ({dropped})" if dropped else "")
        )
    return lines


# ----------------------------------------------------------------------------------------------
# The card


def metadata_header(license_id: str, tags: list[str], base_model: Optional[str]) -> str:
    """The YAML front matter the Hugging Face Hub reads."""
    meta = {"license": license_id, "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    if base_model:
        meta["base_model"] = base_model
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


CARD_METRICS = 8
"""Metrics a stage's row of the card's lineage table shows (key_metrics' first)."""


def lineage_table(records: list[dict]) -> list[str]:
    out = [
        "| stage | status | device | precision | config hash | fingerprint | seconds | key metrics |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ranked = list(key_metrics(r["metrics"]).items())
        metrics = ", ".join(f"{k}={v}" for k, v in ranked[:CARD_METRICS])
        if len(ranked) > CARD_METRICS:
            metrics += f", … ({len(ranked) - CARD_METRICS} more in {r['stage']}/manifest.json)"
        out.append(
            f"| {r['stage']} | {r['status']} | {r.get('device') or '-'} | {r.get('precision') or '-'} "
            f"| `{r['config_hash']}` | `{r['fingerprint']}` "
            f"| {r['seconds'] if r['seconds'] is not None else ''} | {metrics} |"
        )
    return out


def data_origin(run_dir: str | Path, kinds: Optional[dict] = None) -> tuple[str, Optional[str]]:
    """(where the training prompts came from: "recipe", "own prompts" or "unrecorded"; for own prompts, the
    first held-out one, for the card's usage example: a recipe's example stays the quickstart's own task, as a
    recipe's held-out prompts include the harmful ones its refusal task is made of)."""
    synth = _first_instance(kinds, "synth")
    card = _read_json(Path(run_dir) / synth / "card.json") if synth else None
    origin = "unrecorded" if not card else "own prompts" if "prompt_counts" in card else "recipe"
    prompt = None
    eval_rows = Path(run_dir) / synth / "eval.jsonl" if card else None
    if origin == "own prompts" and eval_rows.is_file():
        with eval_rows.open() as f:
            first = f.readline()
        try:
            turns = json.loads(first).get("messages", []) if first.strip() else []
        except (json.JSONDecodeError, AttributeError):
            turns = []
        prompt = next(
            (t.get("content") for t in reversed(turns) if isinstance(t, dict) and t.get("role") == "user"), None
        )
    return origin, prompt if isinstance(prompt, str) and prompt.strip() else None


def limitations(origin: str) -> list[str]:
    """The card's limitation bullets for data of that origin (`data_origin`)."""
    if origin == "recipe":
        return [
            "- Trained on synthetic, templated tasks: it does not generalise beyond them, and its knowledge of "
            "the world is nil at tiny sizes.",
            "- Refusals and self-identification were learnt from a handful of templates; they are not a "
            "safety guarantee and are easy to bypass.",
            "- Evaluation numbers come from held-out prompts of the same generator, not from public benchmarks.",
        ]
    return [
        "- It knows what its base model and the data named under Lineage taught it, and no more; behaviour "
        "outside that data is untested here.",
        "- Evaluation numbers come from held-out prompts of the same data, not from public benchmarks; "
        "measures the data could not support are listed as left out above.",
    ]


def usage_snippets(name: str, model_type: str, prompt: Optional[str] = None) -> list[str]:
    """How to load and chat with the release: transformers and vLLM (`prompt`: the example's user turn)."""
    eager = ', attn_implementation="eager"' if model_type == "gemma2" else ""
    why = "  # eager attention keeps Gemma 2's logit soft-capping" if eager else ""
    from .engines.vllm import UNSUPPORTED_MODEL_TYPES

    text = json.dumps(prompt or "Sort these numbers: 3, 1, 2", ensure_ascii=False)  # a valid Python literal
    transformers = [
        "### transformers",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{name}"  # this directory, or its Hub repo id',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        f"model = AutoModelForCausalLM.from_pretrained(path{eager}){why}",
        f'messages = [{{"role": "user", "content": {text}}}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)",
        "out = model.generate(**inputs, max_new_tokens=64)  # stops on <end_of_turn> (generation_config.json)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    if model_type in UNSUPPORTED_MODEL_TYPES:  # vLLM has no implementation of it: the snippet would fail
        family = UNSUPPORTED_MODEL_TYPES[model_type]
        return transformers + ["### vLLM", "", f"vLLM does not run {family} models: load it with transformers."]
    return transformers + [
        "### vLLM",
        "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "",
        f'llm = LLM("{name}")  # reads generation_config.json: stops on <end_of_turn> and <eos>',
        f'out = llm.chat([{{"role": "user", "content": {text}}}], SamplingParams(temperature=0, max_tokens=64))',
        "print(out[0].outputs[0].text)",
        "```",
    ]


def render_model_card(
    *,
    name: str,
    license_id: str,
    tags: list[str],
    base_model: Optional[str],
    model_info: dict,
    records: list[dict],
    data_lines: list[str],
    eval_markdown: Optional[str],
    description: Optional[str] = None,
    origin: str = "recipe",
    example_prompt: Optional[str] = None,
    evaluated_as: Optional[str] = None,
) -> str:
    """The README.md of a release. `model_info`: architecture, model_type, parameters, dtype, vocab_size,
    max_positions; `records`: read_lineage() of the instances the model descends from, and of the eval whose
    table is shown; `eval_markdown`: the results.md of an eval that answered with the released model, which it
    calls `evaluated_as` (None: none did); `origin` and `example_prompt`: `data_origin()`."""
    # The summary names what made the model; the eval in the records only measured it.
    stages = " -> ".join(r["stage"] for r in records if r["status"] == "complete" and r.get("kind") != "eval")
    summary = description or (
        f"A {model_info['architecture']} causal language model "
        f"({model_info['parameters']:,} parameters) post-trained with posttrain" + (f" ({stages})." if stages else ".")
    )
    out = [
        metadata_header(license_id, tags, base_model),
        f"# {name}",
        "",
        summary,
        "",
        "## Model",
        "",
        f"- Architecture: {model_info['architecture']} (model_type `{model_info['model_type']}`), "
        f"{model_info['parameters']:,} parameters, {model_info['dtype']}",
        f"- Vocabulary: {model_info['vocab_size']} tokens; positions: {model_info['max_positions']}",
        "- Chat format: Gemma (`<start_of_turn>user ... <end_of_turn>`, assistant role `model`, no system "
        "turn); generation stops on `<end_of_turn>` and `<eos>`",
        "- Weights: safetensors only",
        "",
        "## Lineage",
        "",
    ]
    out += data_lines or ["- Base model and data: not recorded in this run directory"]
    out += ["", "Stages of the run, from their manifests:", ""] + lineage_table(records)
    out += ["", "## Evaluation", ""]
    if eval_markdown:
        lines = eval_markdown.strip().splitlines()
        if lines and lines[0].startswith("# "):
            lines = "\n".join(lines[1:]).strip().splitlines()  # its title: this section's own heading replaces it
        if evaluated_as:  # the table may hold other models too (the baseline, siblings)
            out += [f"The released weights are the row **{evaluated_as}** of the table below.", ""]
        out += [("##" + line) if line.startswith("#") else line for line in lines]  # below this section
    else:
        out.append("No eval stage ran on the released model before this release: it is unevaluated here.")
    out += [
        "",
        "## Intended use",
        "",
        "Research and teaching: reproducing a post-training pipeline end to end, and testing tools that "
        "consume chat models. The behaviours it was trained for are those of its data recipe (see "
        "Lineage); "
        + ("judge it by the evaluation above." if eval_markdown else "evaluate it before relying on them."),
        "",
        "## Limitations",
        "",
        *limitations(origin),
        "",
        "## How to use",
        "",
    ]
    out += usage_snippets(name, model_info["model_type"], example_prompt)
    return "\n".join(out) + "\n"
