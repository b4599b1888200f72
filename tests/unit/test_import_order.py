"""The house rule: imports inside star_scale/ flow one way and never in a circle.

Layers, lowest first (a module may import its own layer or lower ones):

    atomic, trust, models.presets, console (leaves every layer may use: file safety, progress)
    config
    models, data, tokenizer
    objectives
    train, parallel, evaluate
    bench, demo, slurm, sweep         (commands)
    cli

Every import counts, also the ones inside functions: a lazy import is still a
dependency. star_scale/ never imports recipes/, cluster/ or tokenize_data/.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "star_scale"

LAYERS = [
    ["atomic", "trust", "models.presets", "console"],
    ["config"],
    ["models", "data", "tokenizer"],
    ["objectives"],
    ["train", "parallel", "evaluate"],
    ["bench", "demo", "slurm", "sweep"],
    ["cli"],
]
FOREIGN = ("recipes", "cluster", "tokenize_data")
MAX_ROOT_MODULES = 4
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement, resolved to the deepest module that exists."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out += [(t, node.lineno) for t in targets]
    return out


def layer_of(name: str) -> int:
    """The layer of star_scale.X.Y: the longest listed prefix of X.Y wins."""
    rel = name.partition(".")[2]
    best, depth = None, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (rel == prefix or rel.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    if best is None:
        raise AssertionError(f"star_scale/{rel.replace('.', '/')}: no layer in tests/unit/test_import_order.py's "
                             "LAYERS; add its folder there")
    return best


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        deps = []
        for target, line in imports_of(name, path, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target.startswith("star_scale.") and target != name and target in known:
                deps.append((target, line))
        edges[name] = deps
    return edges


def rel(name: str) -> str:
    path = modules()[name]
    return str(path.relative_to(ROOT))


def test_no_import_against_the_layer_order():
    wrong = []
    for name, deps in graph().items():
        if name == "star_scale":
            continue
        for target, line in deps:
            if layer_of(target) > layer_of(name):
                wrong.append(f"{rel(name)}:{line} imports {rel(target)} (layer {layer_of(target)} above "
                             f"{layer_of(name)})")
    assert not wrong, "imports against the order (see this test's docstring):\n" + "\n".join(wrong)


def test_no_import_circle():
    edges = {n: [t for t, _ in deps] for n, deps in graph().items()}
    state, stack, circles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in edges[n]:
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(rel(m) for m in c) for c in circles)


def test_nothing_outside_the_package_is_imported():
    known = modules()
    bad = [f"{rel(n)}:{line} imports {t}" for n, p in known.items() for t, line in imports_of(n, p, known)
           if t.split(".")[0] in FOREIGN]
    assert not bad, "\n".join(bad)


def test_root_holds_few_modules_and_files_stay_short():
    root_modules = sorted(p.name for p in PKG.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)


def test_checker_catches_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a copy of the package with one upward import added is caught, naming both files."""
    import shutil

    copy = tmp_path / "star_scale"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / "config.py"
    config.write_text(config.read_text() + "\n\ndef _bad():\n    from star_scale.train import loop  # noqa\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "PKG", copy)
    with pytest.raises(AssertionError, match=r"star_scale/config.py:\d+ imports star_scale/train/loop.py"):
        test_no_import_against_the_layer_order()
    with pytest.raises(AssertionError, match=r"star_scale/config.py -> .*star_scale/config.py"):
        test_no_import_circle()


def test_old_module_paths_warn_and_resolve_to_the_new_module():
    import importlib
    import warnings

    import star_scale
    from star_scale.train import loop

    for old, new in star_scale._MOVED.items():
        assert importlib.util.find_spec(f"star_scale.{new}") is not None, f"star_scale.{old} -> missing {new}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("star_scale.trainer")
        from star_scale.demo import run_demo
    assert old is loop and old.train is loop.train
    assert run_demo.__module__ == "star_scale.demo.run"
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("star_scale.trainer has moved to star_scale.train.loop" in m for m in messages), messages
    assert any("star_scale.demo.run_demo has moved" in m for m in messages), messages
