"""A pipeline as a graph of named stage instances, and everything about it that can be checked before work.

`stages:` lists instances in order. An entry is a stage kind (`sft`: an instance named after its kind) or
`{name: teacher_sft, kind: sft}`; a kind may appear any number of times, and each instance's settings
live in the section named after the instance. An instance reads its inputs from the latest earlier
producer of each artifact kind (the rule of a plain list), or from what its config names: a path, or a
reference `NAME.ARTIFACT` to an earlier instance's artifact (`model: teacher_sft.model`).

`references` finds the fields that may hold such references (typed ModelDir or ModelRef in config.py);
`resolve_references` replaces them by paths — the only place references are resolved. `check_rule_files`
finds every rule reward and hook a config names and checks that its file defines the function (by
reading the file, without running it).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Iterator, Optional

from pydantic import BaseModel, Field, field_validator

from .config import ConfigError, Section, is_path_field, is_reference, is_reference_field

TOP_LEVEL = {"run_dir", "seed", "threads", "device", "precision", "report_to", "stages"}
"""Keys of the pipeline itself, which no instance may be named."""


class StageEntry(Section):
    """One named instance of a stage kind."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    """Instance name: its config section, its directory under run_dir, and NAME in references NAME.ARTIFACT."""
    kind: str
    """Stage kind (synth, base, sft, distill, prefs, rm, dpo, ppo, warp, merge, eval, release, ...)."""

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        from .stages import STAGE_MODULES

        if kind not in STAGE_MODULES:
            raise ValueError(f"unknown stage kind {kind!r}; known kinds: {', '.join(STAGE_MODULES)}")
        return kind


def entries(stages: list) -> list[tuple[str, str]]:
    """(name, kind) of each `stages:` entry, in order; a plain kind names itself."""
    return [(s, s) if isinstance(s, str) else (s.name, s.kind) for s in stages]


def check_entries(stages: list) -> list:
    """Known kinds, unique names that do not shadow a pipeline key."""
    from .stages import STAGE_MODULES

    pairs = entries(stages)
    for name, kind in pairs:
        if kind not in STAGE_MODULES:
            raise ValueError(
                f"unknown stage {kind!r}; known stages: {', '.join(STAGE_MODULES)} "
                f"(or an entry {{name: NAME, kind: KIND}})"
            )
        if name in TOP_LEVEL:
            raise ValueError(f"stage name {name!r} is a pipeline key; choose another name")
        if name in STAGE_MODULES and name != kind:
            raise ValueError(f"stage name {name!r} is the name of another stage kind; choose another name")
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"stage name(s) listed twice: {dup}; give repeated kinds their own names: {{name: NAME, kind: KIND}}"
        )
    return stages


# ----------------------------------------------------------------------------------------------
# References NAME.ARTIFACT


def _typed_strings(section: BaseModel, test, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every string in the fields `test(field info)` accepts, a list's or a mapping's
    items included, through nested sections and mixtures."""
    for field_name, info in type(section).model_fields.items():
        value = getattr(section, field_name)
        key = f"{prefix}{field_name}"
        if isinstance(value, BaseModel):
            yield from _typed_strings(value, test, key + ".")
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):  # a mixture
            for i, item in enumerate(value):
                yield from _typed_strings(item, test, f"{key}.{i}.")
        elif test(info):
            items = (
                value.items()
                if isinstance(value, dict)
                else enumerate(value)
                if isinstance(value, list)
                else [(None, value)]
            )
            for sub, item in items:
                if isinstance(item, str):
                    yield (key if sub is None else f"{key}.{sub}"), item


def references(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every reference `NAME.ARTIFACT` in fields that may hold one (recursively)."""
    for key, value in _typed_strings(section, is_reference_field, prefix):
        if is_reference(value):
            yield key, value


def named_files(section: BaseModel) -> list[str]:
    """The existing files and directories a stage section names to read: the values of its path-typed fields
    and its rule and hook files. By type, so that a value such as `backend: hf` is never taken for a file or
    folder the working directory happens to hold."""
    paths = [value for _, value in _typed_strings(section, is_path_field)]
    paths += [path for _, path, _ in function_specs(section)]
    return [p for p in dict.fromkeys(paths) if 0 < len(p) < 4096 and Path(p).exists()]


def check_references(
    section: BaseModel, stage: str, artifacts: dict, unfinished: tuple = (), later: tuple = ()
) -> dict[str, str]:
    """Dotted key -> reference of every reference in `section`; one that no earlier instance produces is a
    ConfigError naming the key and the artifacts that do exist (`unfinished`: earlier instances that have not
    finished in the run directory, whose artifacts are not there yet; `later`: the instances after `stage`)."""
    found = dict(references(section))
    for key, ref in found.items():
        if ref in artifacts:
            continue
        if ref.split(".")[0] in later:
            raise ConfigError(
                f"{stage}.{key}={ref!r}: stage {ref.split('.')[0]!r} runs after {stage!r}; a reference reads an "
                f"earlier stage's output: list {ref.split('.')[0]!r} before {stage!r} in `stages`"
            )
        if ref.split(".")[0] in unfinished:
            raise ConfigError(
                f"{stage}.{key}={ref!r}: stage {ref.split('.')[0]!r} has not finished in this run directory; "
                f"run it first"
            )
        known = ", ".join(sorted(k for k in artifacts if "." in k)) or "none"
        raise ConfigError(
            f"{stage}.{key}={ref!r}: no earlier stage produces this artifact (earlier stages' "
            f"artifacts: {known}); name an earlier stage and one of its artifacts, or give a path (no file or "
            f"directory {ref!r} exists)"
        )
    return found


def resolve_references(
    section: BaseModel, stage: str, artifacts: dict, unfinished: tuple = (), later: tuple = ()
) -> tuple[BaseModel, dict[str, str]]:
    """A copy of `section` with every reference replaced by the artifact's path, and key -> reference of
    each (for fingerprints)."""
    found = check_references(section, stage, artifacts, unfinished, later)
    if not found:
        return section, {}
    data = section.model_dump()
    for key, ref in found.items():
        _set(data, key.split("."), artifacts[ref])
    return type(section).model_validate(data), found


def _set(tree, path: list[str], value) -> None:
    for part in path[:-1]:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    last = path[-1]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


# ----------------------------------------------------------------------------------------------
# Rule rewards and hooks named by file and function


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid Python: {err.msg}") from None


def _missing_import(tree: ast.Module, folder: Path) -> Optional[tuple[int, str]]:
    """(line, module) of the first top-level absolute import that is neither installed nor a module or package
    beside the file (where the scorer lets it import from), found without running the file."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            beside = (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()
            if not beside and importlib.util.find_spec(top) is None:
                return node.lineno, module
    return None


def _function_names(tree: ast.Module) -> set[str]:
    """Top-level functions and callables assigned at top level in a parsed Python file."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def function_specs(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted key, file, function) of every rule reward (`{path, function}`) and hook ('file.py:function')."""
    for field_name in type(section).model_fields:
        value = getattr(section, field_name)
        key = f"{prefix}{field_name}"
        if isinstance(value, BaseModel):
            if {"path", "function"} <= set(type(value).model_fields):
                yield key, value.path, value.function
            else:
                yield from function_specs(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from (
                        function_specs(item, f"{key}.{i}.")
                        if not {"path", "function"} <= set(type(item).model_fields)
                        else [(f"{key}.{i}", item.path, item.function)]
                    )
        elif isinstance(value, str) and ".py:" in value:
            path, function = value.rsplit(":", 1)
            yield key, path, function


def check_rule_files(section: BaseModel, stage: str) -> None:
    """Every rule reward and hook names an existing file that defines the function."""
    for key, path, function in function_specs(section):
        check_function_file(f"{stage}.{key}", path, function)


def check_function_file(key: str, path: str, function: str) -> None:
    """The file `path` (set by config key `key`) exists, is valid Python, defines `function` at its top level and
    imports nothing that is missing; read, not run."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: file not found: {path} (relative paths are read from {Path.cwd()})")
    tree = _parse(file)
    if function not in _function_names(tree):
        raise ConfigError(f"{key}: {path} defines no function {function!r} at its top level")
    missing = _missing_import(tree, file.resolve().parent)
    if missing:
        raise ConfigError(
            f"{key}: {path}:{missing[0]} imports {missing[1]!r}, which is neither installed nor a module beside "
            "the file"
        )


def artifact_keys(name: str, produces: dict) -> list[str]:
    """The keys an instance's artifacts are found under: the kind (latest producer) and NAME.KIND."""
    return [k for kind in produces for k in (kind, f"{name}.{kind}")]
