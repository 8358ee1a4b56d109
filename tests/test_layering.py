"""Imports only go downward through the layers of ``docs/design.md``, and no modules import each other.

Every module of ``quark/`` is parsed with ``ast`` (nothing is imported), every ``import`` statement is
collected, wherever it sits (module level, inside a function, under ``TYPE_CHECKING``: a lazy import
still ties the two modules together), and each edge is checked against the layer table below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "quark"

# Module prefix -> layer of docs/design.md (the longest matching prefix wins).
LAYERS: dict[str, int] = {
    # Package roots import nothing when imported (quark.torch resolves its public names lazily; an
    # import of one of those names counts as an import of the module that defines it).
    "quark": 0,
    "quark.torch": 0,
    "quark.torch.quantization.config": 1,
    # The format table is data the config layer validates against (a dtype's kind, range, block);
    # it imports only config/type.py.
    "quark.torch.quantization.formats.table": 1,
    "quark.torch.quantization.formats": 2,
    "quark.torch.quantization.observer": 3,
    # The package imports the observer layer so that the built-in observers are registered with the
    # config layer's allow-list before any QuantizationSpec is built.
    "quark.torch.quantization": 3,
    "quark.torch.quantization.tensor_quantize": 4,
    "quark.torch.quantization.nn": 5,
    "quark.torch.quantization.config.resolve": 6,
    "quark.torch.quantization.model_transformation": 6,
    "quark.torch.quantization.moe_experts": 6,
    "quark.torch.quantization.calibration": 6,
    # The algorithm layer registers its two entry points here; ModelQuantizer looks them up.
    "quark.torch.quantization.algorithm_registry": 6,
    "quark.torch.algorithm": 7,
    "quark.torch.quantization.api": 8,
    "quark.torch.export": 9,
    "quark.torch.llm": 10,
}

# Packages whose prefix covers only the package's own __init__, not its submodules: a new
# subpackage must get its own row above rather than silently inheriting one of these.
PACKAGE_ONLY = {"quark", "quark.torch", "quark.torch.quantization"}

# Top-level packages of quark.torch: imports between them must not form a cycle either.
TOP_PACKAGES = ("quark.torch.quantization", "quark.torch.algorithm", "quark.torch.export", "quark.torch.llm")

# Known exceptions (importer, imported), each with the reason; nothing else may break the rules.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class ImportEdge:
    """One import statement: ``importer`` imports ``imported`` (both dotted module names)."""

    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} (line {self.line})"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def lazy_exports(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Per package, the names its ``__getattr__`` imports on first use: a ``_LAZY = {name: module}`` literal."""
    found: dict[str, dict[str, str]] = {}
    for name, path in modules.items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "_LAZY"):
                found[name] = ast.literal_eval(node.value)
    return found


def _targets(importer: str, is_package: bool, node: ast.AST, modules: dict[str, Path],
             lazy: dict[str, dict[str, str]]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = _absolute(importer, is_package, node)
        for alias in node.names:
            # ``from package import submodule`` imports the submodule; ``from module import name`` the module;
            # a package's lazily exported name, the module that defines it.
            sub = f"{base}.{alias.name}"
            yield sub if sub in modules else lazy.get(base, {}).get(alias.name, base)


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(modules: dict[str, Path]) -> list[ImportEdge]:
    edges: list[ImportEdge] = []
    lazy = lazy_exports(modules)
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            for target in _targets(importer, is_package, node, modules, lazy):
                imported = _owning_module(target, modules) if target.split(".")[0] == "quark" else None
                if imported is not None and imported != importer:
                    edges.append(ImportEdge(importer, imported, getattr(node, "lineno", 0)))
    return edges


def layer_of(module: str) -> tuple[str, int]:
    """The matching prefix of ``LAYERS`` and its layer."""
    prefix = module
    while prefix:
        if prefix in LAYERS and (prefix == module or prefix not in PACKAGE_ONLY):
            return prefix, LAYERS[prefix]
        prefix = prefix.rpartition(".")[0]
    raise KeyError(module)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return all_modules()


@pytest.fixture(scope="module")
def edges(modules: dict[str, Path]) -> list[ImportEdge]:
    return [e for e in import_edges(modules) if (e.importer, e.imported) not in ALLOWED]


def test_every_module_has_a_layer(modules: dict[str, Path]) -> None:
    unplaced = [m for m in modules if _unplaced(m)]
    assert not unplaced, f"modules without a row in LAYERS (add one, see docs/design.md): {unplaced}"


def _unplaced(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return True
    return False


def test_imports_only_go_downward(edges: list[ImportEdge]) -> None:
    upward = [f"{e}: layer {layer_of(e.importer)[1]} imports layer {layer_of(e.imported)[1]}"
              for e in edges if layer_of(e.imported)[1] > layer_of(e.importer)[1]]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules(edges: list[ImportEdge]) -> None:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
    found = cycles(graph)
    assert not found, f"modules importing each other: {found}"


def test_no_import_cycle_between_top_packages(edges: list[ImportEdge]) -> None:
    def top(module: str) -> str | None:
        return next((p for p in TOP_PACKAGES if module == p or module.startswith(p + ".")), None)

    graph: dict[str, set[str]] = {}
    witness: dict[tuple[str, str], ImportEdge] = {}
    for e in edges:
        a, b = top(e.importer), top(e.imported)
        if a is not None and b is not None and a != b:
            graph.setdefault(a, set()).add(b)
            witness.setdefault((a, b), e)
    found = cycles(graph)
    detail = [str(w) for (a, b), w in witness.items() if any(a in c and b in c for c in found)]
    assert not found, f"packages importing each other: {found}; through: {detail}"


def test_allow_list_entries_still_exist(modules: dict[str, Path]) -> None:
    present = {(e.importer, e.imported) for e in import_edges(modules)}
    stale = [pair for pair in ALLOWED if pair not in present]
    assert not stale, f"ALLOWED lists imports that no longer exist (delete them): {stale}"


# --------------------------------------------------------------------------------------------
# The checker itself
# --------------------------------------------------------------------------------------------
def test_checker_sees_lazy_relative_and_submodule_imports(tmp_path: Path) -> None:
    fake = {"quark.a": tmp_path / "a.py", "quark.pkg": tmp_path / "pkg" / "__init__.py",
            "quark.pkg.sub": tmp_path / "pkg" / "sub.py"}
    for path in fake.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    fake["quark.a"].write_text("def f():\n    from quark.pkg import sub\n    return sub\n")
    fake["quark.pkg"].write_text("from . import sub\nfrom quark.a import f\n")
    fake["quark.pkg.sub"].write_text("import os\nfrom ..a import f\n")
    found = {(e.importer, e.imported) for e in import_edges(fake)}
    assert found == {("quark.a", "quark.pkg.sub"), ("quark.pkg", "quark.pkg.sub"), ("quark.pkg", "quark.a"),
                     ("quark.pkg.sub", "quark.a")}
    assert cycles({k: {b for a, b in found if a == k} for k, _ in found}) == [["quark.a", "quark.pkg.sub"]]


def test_checker_follows_lazily_exported_names(tmp_path: Path) -> None:
    fake = {"quark.pkg": tmp_path / "pkg" / "__init__.py", "quark.pkg.impl": tmp_path / "pkg" / "impl.py",
            "quark.user": tmp_path / "user.py"}
    fake["quark.pkg"].parent.mkdir()
    fake["quark.pkg"].write_text('_LAZY = {"Thing": "quark.pkg.impl"}\n')
    fake["quark.pkg.impl"].write_text("Thing = 1\n")
    fake["quark.user"].write_text("from quark.pkg import Thing\n")
    assert [(e.importer, e.imported) for e in import_edges(fake)] == [("quark.user", "quark.pkg.impl")]


def test_layer_table_places_modules_as_the_design_says() -> None:
    assert layer_of("quark.torch.quantization.config.spec")[1] == 1
    assert layer_of("quark.torch.quantization.config.resolve")[1] == 6
    assert layer_of("quark.torch.quantization.observer.observer")[1] == 3
    assert layer_of("quark.torch.export.hf_format.writer")[1] == 9
    with pytest.raises(KeyError):
        layer_of("quark.torch.newpackage.module")  # quark.torch covers only its own __init__


# --------------------------------------------------------------------------------------------
# The observer allow-list reaches the config layer without an upward import
# --------------------------------------------------------------------------------------------
def test_config_layer_alone_resolves_observer_names() -> None:
    """A fresh interpreter that imports only the config layer still knows every built-in observer."""
    code = (
        "from quark.torch.quantization.config.config import QuantizationSpec\n"
        "from quark.torch.quantization.config.custom_config import FP8_PER_TENSOR_SPEC\n"
        "spec = QuantizationSpec.from_dict({'dtype': 'int8', 'qscheme': 'per_tensor',\n"
        "    'observer_cls': 'PerTensorMSEObserver', 'symmetric': True, 'round_method': 'half_even',\n"
        "    'scale_type': 'float', 'is_dynamic': False})\n"
        "print(spec.observer_cls.__module__, spec.observer_cls.__name__,\n"
        "      FP8_PER_TENSOR_SPEC.observer_cls.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE_ROOT.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["quark.torch.quantization.observer.observer", "PerTensorMSEObserver",
                                     "PerTensorMinMaxObserver"]


def test_observer_registry_refuses_a_second_class_under_a_taken_name() -> None:
    from quark.torch.quantization.config.observer_registry import register_observer, registered_observers
    from quark.torch.quantization.observer.observer import PerTensorMinMaxObserver

    assert registered_observers()["PerTensorMinMaxObserver"] is PerTensorMinMaxObserver
    assert register_observer(PerTensorMinMaxObserver) is PerTensorMinMaxObserver  # same class again: no-op
    impostor = type("PerTensorMinMaxObserver", (), {"qschemes": (), "kinds": ()})
    with pytest.raises(ValueError, match=r"PerTensorMinMaxObserver.*already registered"):
        register_observer(impostor)
    with pytest.raises(ValueError, match="must declare qschemes"):
        register_observer(type("NoSupportDeclared", (), {}))
    assert registered_observers()["PerTensorMinMaxObserver"] is PerTensorMinMaxObserver


def test_algorithm_runners_reach_model_quantizer_through_the_registry() -> None:
    """quantization/api.py never imports the algorithm layer; the registry finds its entry points."""
    code = ("import sys\n"
            "from quark.torch.quantization.api import ModelQuantizer\n"
            "assert 'quark.torch.algorithm.api' not in sys.modules\n"
            "from quark.torch.quantization.algorithm_registry import algorithm_runner\n"
            "print(algorithm_runner('pre_quant').__name__, algorithm_runner('advanced').__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE_ROOT.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["apply_pre_quant_optimization", "apply_advanced_algorithm"]
