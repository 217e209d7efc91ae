"""The import graph, read statically from the source (imports inside functions included, annotation-
only `if TYPE_CHECKING:` imports excluded): no module cycle, no package cycle, and the layers the
design promises: `llmtune.config` sits on the registries and data declarations only, so validating
a recipe can never pull in stages, models or torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ("llmtune", "webui")
# What each low layer may import (besides itself and llmtune.errors).
LAYERS = {
    "llmtune.registry": {"llmtune.registry"},
    "llmtune.data": {"llmtune.data", "llmtune.registry"},
    "llmtune.config": {"llmtune.config", "llmtune.data", "llmtune.registry"},
}


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports, wherever the import statement is."""
    found: set[str] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in modules else node.module)
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def package_of(module: str) -> str:
    """llmtune.config.checks.data -> llmtune.config; llmtune.cli -> llmtune.cli; webui.app -> webui."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "llmtune" else parts[0]


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_module_cycle() -> None:
    assert cycle(graph()) is None, " -> ".join(cycle(graph()) or [])


def test_no_package_cycle() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in graph().items():
        packages.setdefault(package_of(module), set()).update(package_of(t) for t in targets)
    for name, targets in packages.items():
        targets.discard(name)
    found = cycle(packages)
    assert found is None, " -> ".join(found or [])


def test_config_data_and_registry_import_nothing_above_them() -> None:
    for module, targets in graph().items():
        layer = next((low for low in LAYERS if module == low or module.startswith(low + ".")), None)
        if layer is None:
            continue
        above = {t for t in targets if package_of(t) not in LAYERS[layer] | {"llmtune.errors"}}
        assert not above, f"{module} imports {sorted(above)}"


@pytest.mark.slow
def test_the_core_does_not_import_the_web_ui() -> None:
    for module, targets in graph().items():
        if module.startswith("llmtune"):
            assert not {t for t in targets if t.startswith("webui")}, module


def test_the_analysis_sees_lazy_imports() -> None:
    """Function-level imports are edges (the cycles this test guards against were lazy ones)."""
    edges = graph()
    assert "llmtune.stages.seq2seq_dpo" in edges["llmtune.stages.dpo"]
    assert "llmtune.rewards.mix" in edges["llmtune.rewards"]
    assert "llmtune.config.checks.model" in edges["llmtune.config.schema"]
