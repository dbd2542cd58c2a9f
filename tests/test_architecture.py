"""The package's imports form no circle (function-level imports included): each module can be read, tested and
replaced standing on what it imports, never on something that imports it back."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgekit"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """edgekit modules `path` imports anywhere in its body; `from edgekit.x import y` counts y when y is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found - {_module(path)}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    # importing a package's submodule runs the package's __init__, which is not an edge of its own here
    return {m: {i for i in _imports(p, known) if i not in packages or files[i].stat().st_size > 0}
            for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_walk_finds_a_circle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    with pytest.raises(AssertionError):
        assert _cycle({"a": {"b"}, "b": {"a"}}) is None


def _choices(section: type, key: str) -> set:
    import typing

    hint = typing.get_type_hints(section)[key]
    while typing.get_origin(hint) is list:
        (hint,) = typing.get_args(hint)
    return set(typing.get_args(hint))


def test_config_choices_match_the_registries():
    """The config names its choices as Literals (validated on load, light to import); each must be a registered
    implementation and each registered implementation a choice."""
    from edgekit import config, formats, targets
    from edgekit.models import zoo
    from edgekit.stages import distill, prune

    assert _choices(config.PruneConfig, "method") == set(prune.METHODS) | {"magnitude"}  # magnitude: NNCF sparsity
    assert _choices(config.DistillConfig, "losses") == set(distill.LOSSES)
    assert _choices(config.ModelConfig, "name") == set(zoo.REGISTRY)
    assert _choices(config.DistillConfig, "student") == set(zoo.REGISTRY) | {"pruned"}
    assert {r for t in targets.builtin().values() for a in t.artifacts for r in [a.runtime]} <= set(formats.runtimes())
