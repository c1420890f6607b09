"""The package's imports go one way: each module imports only from its own layer or those below,
and no module imports itself back through others (a cycle)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "adntn"
# lowest first: maths never imports I/O, the library never imports the CLI
LAYERS = (
    ("adntn.errors", "adntn.version", "adntn.memory", "adntn.progress", "adntn.seeding", "adntn.distributed"),
    ("adntn.core",),
    ("adntn.networks",),
    ("adntn.io", "adntn.models", "adntn.data"),
    ("adntn.training",),
    ("adntn.pipeline",),
    ("adntn.cli", "adntn.demo", "adntn.__main__", "adntn"),
)


def module_name(path: Path) -> str:
    parts = ("adntn",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(name: str) -> set[str]:
    """The adntn modules that module ``name`` imports anywhere in its body (functions too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from adntn import networks` imports the module adntn.networks
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def layer_of(name: str) -> int:
    """The rank of the longest prefix in LAYERS that names ``name`` or a package above it."""
    matches = [(len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1]


def test_every_module_has_a_layer():
    for name in MODULES:
        assert layer_of(name) >= 0, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    upward = sorted(other for other in imported(name) if layer_of(other) > layer_of(name))
    assert not upward, f"{name} imports {upward} from a higher layer"


def test_no_import_cycles():
    graph = {name: imported(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycle = path[path.index(other):] + [other] if other in path else [name, other]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other, path + [other])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A maths module importing the pipeline (inside a function) is both upward and a cycle."""
    assert (layer_of("adntn.core.spec"), layer_of("adntn.pipeline.compress"), layer_of("adntn")) == (1, 5, 6)
    (tmp_path / "spec.py").write_text("def f():\n    from ..pipeline import compress\n")
    monkeypatch.setitem(MODULES, "adntn.core.spec", tmp_path / "spec.py")
    assert imported("adntn.core.spec") == {"adntn.pipeline.compress"}
    with pytest.raises(AssertionError, match="from a higher layer"):
        test_imports_go_down_the_layers("adntn.core.spec")
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
