"""The benchmarks in bench/ import posttrain's functions inside their children, where a renamed or moved
function surfaces only when someone runs the benchmark (bench/rm_heads.py imported `tokenize_pairs` from a
module it had left). Every `from posttrain... import name` in bench/ must resolve."""

import ast
import importlib
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _posttrain_imports() -> list[tuple[str, int, str, str]]:
    found = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "posttrain":
                found += [(path.name, node.lineno, node.module, alias.name) for alias in node.names]
    return found


def test_every_posttrain_name_a_benchmark_imports_exists():
    imports = _posttrain_imports()
    assert len({file for file, *_ in imports}) >= 8  # the scan sees the benchmarks' imports
    missing = []
    for file, line, module, name in imports:
        mod = importlib.import_module(module)
        submodule = hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None
        if not hasattr(mod, name) and not submodule:
            missing.append(f"bench/{file}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)
