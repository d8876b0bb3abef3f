"""The package's layering: each module imports only modules of its own layer or below (deferred imports
included), and no module imports itself back through others. A new module must be given a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "rredcot"

# Bottom to top. A module may import from its own layer and the layers below it, never from above.
LAYERS = [
    (
        "base",
        {
            "types",
            "errors",
            "ranges",
            "registry",
            "ui",
            "correlation",
            "stats",
            "stopping",
            "watch",
            "sections",
            "estimator_spec",
            "oserrors",
            "batch_fit",
        },
    ),
    ("collectives", {"collectives", "sharding"}),
    ("log-probs and losses", {"logprobs", "surrogates", "losses", "advantages", "lora", "optim", "dynamic_sampling"}),
    ("stages and tasks", {"stages", "stages.*", "task", "task.*"}),
    ("config", {"compose", "checks", "startup", "trackers"}),
    (
        "metrics and run directory",
        {"metrics", "evaluate", "runlog", "runlock", "runconfig", "runs", "critic", "assemble"},
    ),
    ("trainer", {"trainer", "trainer_setup"}),
    ("commands", {"credit_report", "compare", "compare_report", "cli", "__main__"}),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__") if name != "__init__" else ""] = p
    return out


def _layer(name: str) -> int | None:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if name == m or (m.endswith(".*") and name.startswith(m[:-1])):
                return i
    return None


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules `path` imports, at the top or inside functions (`from rredcot import x` counts x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for n in names:
            if n == "rredcot" or not n.startswith("rredcot."):
                continue
            n = n.removeprefix("rredcot.")
            while n and n not in mods:  # a name imported from a module: the module
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if m and _layer(m) is None)
    assert not missing, f"give these modules a layer in tests/unit/test_layers.py: {missing}"


def test_no_module_imports_one_above_it():
    mods = _modules()
    wrong = []
    for m, path in mods.items():
        if not m:
            continue
        for dep in _imports(path, mods):
            if dep and _layer(dep) is not None and _layer(dep) > _layer(m):
                wrong.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_circle():
    mods = _modules()
    edges = {
        m: {d for d in _imports(p, mods) if d and d != m and not m.startswith(d + ".")} for m, p in mods.items() if m
    }
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return [*path[path.index(d) :], d] if d in path else [m, d]
            if d not in state:
                cycle = visit(d, [*path, d])
                if cycle:
                    return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m, [m])
            assert cycle is None, " -> ".join(cycle)
