"""The import graph only points down (docs/ARCHITECTURE.md section 2): every import of the
project's own code, at module level or inside a function, goes to the importer's own layer or
one below it. Read from the source files with `ast`, independently of what Python loads."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bottom to top; datamodules sits with modules; the entry points are the top-level scripts
LAYERS = [["common"], ["samplers"], ["predictors"], ["values"], ["modules", "datamodules"],
          ["callbacks"], ["entry"], ["bench"], ["train", "locate_values", "train_predictor"]]
LAYER = {name: k for k, names in enumerate(LAYERS) for name in names}


def project_imports() -> list[tuple[str, str, str]]:
    """(importing file, its package, imported package) for every import of project code."""
    files = [p for name in LAYER for p in (sorted((ROOT / name).rglob("*.py"))
                                           if (ROOT / name).is_dir() else [ROOT / f"{name}.py"])]
    out = []
    for path in files:
        package = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in LAYER:
                    out.append((str(path.relative_to(ROOT)), package, top))
    return out


def test_every_import_points_down_or_sideways():
    edges = project_imports()
    assert len(edges) > 100  # the walk found the project's imports
    upward = [f"{where} ({package}, layer {LAYER[package]}) imports {target} (layer "
              f"{LAYER[target]})" for where, package, target in edges
              if LAYER[target] > LAYER[package]]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)
    # every package of the tree has a layer (a new one must be placed in the order)
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages - {"tests"} <= set(LAYER), packages - set(LAYER)


def test_no_package_level_cycle():
    """Layering implies it; checked on its own so that a same-layer pair (modules and
    datamodules) cannot form one either."""
    graph: dict[str, set[str]] = {}
    for _, package, target in project_imports():
        if package != target:
            graph.setdefault(package, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in graph.get(start, ()))

    cycles = [p for p in graph if reaches(p, p, {p})]
    assert not cycles, f"package-level import cycles through {sorted(cycles)}"


def test_the_architecture_document_states_the_same_order():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    order = " < ".join(names[0] if len(names) == 1 else names[0] for names in LAYERS[:-1])
    assert f"Layers, bottom to top: {order} < entry points" in text
