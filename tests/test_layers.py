"""The files' layers (docs/design.md, "Files and layers"), read from the source with `ast`: a file
imports only files of its own or a lower layer, the imports between the project's files have no
cycle, and no project file is imported inside a function (a lazy import of an optional library such
as matplotlib is fine). The checks are shown to fail on small graphs made here."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {  # 1 geometry and maths, 2 model and data contract, 3 programs
    1: ["lattice", "kernels", "attention"],
    2: ["model", "pyramid", "baselines", "losses", "data", "files"],
    3: ["train", "augment", "runs", "conformal", "eval", "predict", "plots", "hest", "synthetic",
        "protocols", "checks", "bench", "bench_accuracy", "bench_runs", "gpu_check", "threads"],
}
LAYER = {name: k for k, names in LAYERS.items() for name in names}


def project_imports(path: Path, project: set[str]) -> list[tuple[str, bool]]:
    """(imported project module, inside a function?) for every `import x` / `from x import ...` of a
    file."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child,
                                              (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            found.extend((n, in_function) for n in names if n in project)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None (depth-first search, three
    colours)."""
    colour, stack = {}, []

    def dfs(u):
        colour[u] = "grey"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if colour.get(v) == "grey":
                return stack[stack.index(v):] + [v]
            if v not in colour and (c := dfs(v)):
                return c
        colour[u] = "black"
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in colour and (c := dfs(u)):
            return c
    return None


def problems(imports: dict[str, list[tuple[str, bool]]], layer: dict[str, int]) -> list[str]:
    """Every breach of the rules in a graph {file: [(imported file, inside a function?)]}."""
    out = [f"{m}: not in any layer of LAYERS" for m in sorted(imports) if m not in layer]
    for m, edges in sorted(imports.items()):
        for target, in_function in edges:
            if in_function:
                out.append(f"{m} imports {target} inside a function")
            if target in layer and m in layer and layer[target] > layer[m]:
                out.append(f"{m} (layer {layer[m]}) imports {target} (layer {layer[target]})")
    cycle = find_cycle({m: {t for t, _ in edges if t != m} for m, edges in imports.items()})
    if cycle:
        out.append("import cycle: " + " -> ".join(cycle))
    return out


def repository_imports() -> dict[str, list[tuple[str, bool]]]:
    files = sorted(ROOT.glob("*.py"))
    project = {p.stem for p in files}
    return {p.stem: project_imports(p, project) for p in files}


def test_the_files_keep_their_layers():
    imports = repository_imports()
    assert set(imports) == set(LAYER), ("a file is missing from LAYERS or LAYERS names a file "
                                        "that is gone")
    assert problems(imports, LAYER) == []


def test_train_and_eval_import_no_program_a_fork_may_delete_without_a_guard():
    """train.py and eval.py run in a copy without hest, synthetic, plots, protocols and bench*:
    train.py imports protocols and synthetic only in a try / except ModuleNotFoundError at the top
    level."""
    deletable = {"hest", "synthetic", "plots", "protocols", "bench", "bench_accuracy", "bench_runs",
                 "gpu_check"}
    for name in ("train", "eval"):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        guarded = {a.name for node in tree.body if isinstance(node, ast.Try) for stmt in node.body
                   if isinstance(stmt, ast.Import) for a in stmt.names}
        plain = ({a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
                 | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)})
        assert not plain & deletable, (name, plain & deletable)
        assert guarded <= deletable


# ---- the checks fail where they should -----------------------------------------------------------
def test_a_cycle_is_found():
    layer = {"a": 3, "b": 3, "c": 3}
    imports = {"a": [("b", False)], "b": [("c", False)], "c": [("a", False)]}
    assert problems(imports, layer) == ["import cycle: a -> b -> c -> a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_an_upward_import_and_a_function_import_are_found():
    layer = {"lattice": 1, "model": 2, "train": 3}
    assert problems({"model": [("train", False)], "train": [], "lattice": []}, layer) == \
        ["model (layer 2) imports train (layer 3)"]
    assert problems({"train": [("model", True)], "model": [("lattice", False)], "lattice": []},
                    layer) == ["train imports model inside a function"]
    assert problems({"stray": []}, layer) == ["stray: not in any layer of LAYERS"]


def test_imports_are_read_at_every_depth(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nimport data\nfrom model import x\ntry:\n    import hest\n"
                   "except ImportError:\n    hest = None\n\ndef f():\n    import eval as ev\n"
                   "    import matplotlib\n    class C:\n        def g(self):\n"
                   "            from lattice import y\n")
    got = project_imports(src, {"data", "model", "hest", "eval", "lattice"})
    assert got == [("data", False), ("model", False), ("hest", False), ("eval", True),
                   ("lattice", True)]


CORE = ["lattice", "attention", "model", "pyramid", "data", "train", "eval",
        "kernels", "threads", "bench_runs"]   # the design card's files, and the ones beside them


@pytest.mark.parametrize("name", CORE)
def test_the_core_files_lines_fit_in_100_characters(name):
    """Files are cut by concept, not by a line count; a line fits in 100 characters."""
    long = [n for n, line in enumerate((ROOT / f"{name}.py").read_text().splitlines(), 1)
            if len(line) > 100]
    assert not long, f"{name}.py: lines {long[:10]} are over 100 characters"
