"""The layer contract (docs/architecture.md): no module of datainf imports a module of a layer above it.

Data flows one way: tasks -> per-example gradients -> gradient store -> methods -> scores ->
evaluation / report -> runs and workflows -> demos -> CLI. The test reads every import statement of
the package, function-level imports included (the package imports heavy dependencies lazily, so
top-level imports alone would miss most edges), and checks each edge against the table below.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "datainf"

#: Lowest layer first. A module may import modules of lower layers only (and itself, of course);
#: modules of one layer are independent of each other. Keep docs/architecture.md in step.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("settings", "distributed", "store", "data", "evaluation", "diffusers_io"),
    ("tasks", "scores", "runs", "factors"),
    ("models", "gradients", "methods"),
    ("finetune", "influence", "testing", "reference", "report", "baselines", "plan"),
    ("explain", "workflows", "relabel", "integrations"),
    ("counterfactual",),
    ("clean",),
    ("demos",),
    ("cli",),
)

#: ``datainf/__init__.py`` is the package's facade: it re-exports the public API (lazily) and may
#: import any layer; ``datainf.__version__`` is a constant every layer may read.
FACADE = "datainf"


def _layer_of() -> dict[str, int]:
    return {name: index for index, names in enumerate(LAYERS) for name in names}


def _component(module: str) -> str:
    """``datainf.gradients.hooks`` -> ``gradients``; ``datainf`` -> ``datainf``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _own_component(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return relative.parts[0] if relative.parts[0] != "__init__" else FACADE


def import_edges() -> list[tuple[str, str, str]]:
    """``(importing component, imported component, "file:line")`` for every import of a datainf module."""
    edges: list[tuple[str, str, str]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _own_component(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "datainf":  # from datainf import x: x is a component (or __version__)
                    targets = [f"datainf.{alias.name}" for alias in node.names]
                elif node.module.startswith("datainf."):
                    targets = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                raise AssertionError(f"{path}:{node.lineno}: relative import; datainf uses absolute imports")
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("datainf.")]
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            edges += [(own, _component(target), where) for target in targets]
    return edges


def test_every_component_has_a_layer() -> None:
    components = {_own_component(path) for path in PACKAGE.rglob("*.py")} - {FACADE}
    missing = sorted(components - set(_layer_of()))
    assert not missing, f"place the new module(s) {missing} in LAYERS (tests/test_layers.py and docs/architecture.md)"
    stale = sorted(set(_layer_of()) - components)
    assert not stale, f"LAYERS names modules that no longer exist: {stale}"


def test_no_module_imports_a_layer_above_or_beside_it() -> None:
    layer = _layer_of()
    edges = import_edges()
    assert len(edges) > 50, "the import scan found almost nothing: is PACKAGE right?"
    violations = [
        f"{where}: {own} (layer {layer[own]}) imports {target} (layer {layer[target]})"
        for own, target, where in edges
        if own != FACADE and target != own and target in layer and layer[target] >= layer[own]
    ]
    assert not violations, "imports against the layer contract:\n" + "\n".join(violations)


def test_imports_name_real_modules() -> None:
    """Every imported component exists (or is the version constant), so a typo cannot hide an edge."""
    allowed = set(_layer_of()) | {"__version__", FACADE}
    unknown = sorted({f"{where}: {target}" for _, target, where in import_edges() if target not in allowed})
    assert not unknown, unknown


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from datainf.cli import main\n", ("store", "cli")),
        ("import datainf.workflows\n", ("store", "workflows")),
        ("from datainf import demos\n", ("store", "demos")),
    ],
)
def test_the_scan_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source, expected) -> None:
    """Negative control: a store module that imports a higher layer is reported."""
    fake = tmp_path / "datainf"
    (fake / "store").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "store" / "__init__.py").write_text("def f():\n    " + source.replace("\n", "\n    "))
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    edges = [(own, target) for own, target, _ in import_edges()]
    assert expected in edges
    layer = _layer_of()
    assert layer[expected[1]] > layer[expected[0]]
