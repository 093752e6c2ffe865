"""The package's layering, read from its source with `ast` (nothing is imported):

- the module-level imports between dpojax's modules form no cycle, so every module sits below the ones it uses;
- no function or class imports a dpojax module (a function-level import hides a dependency, and usually a cycle);
- every shape suffix of an identifier (`ids_BxT`, `q_BxTxHxDh`) uses only the letters of `dpojax.glossary`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from dpojax.glossary import LETTERS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dpojax"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(folder: Path) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(folder.rglob("*.py"))}


MODULES = _modules(PACKAGE)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(import node, scope) for every import: scope "module" (module level, also inside a module-level `if`/`try`,
    except under `if TYPE_CHECKING:`), "type_checking", or "function"/"class" (the innermost enclosing one)."""

    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, scope
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, "function")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, "class")
            elif isinstance(child, ast.If) and scope == "module" and _is_type_checking(child):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "type_checking")
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), scope)
            else:
                yield from walk(child, scope)

    yield from walk(tree, "module")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dpojax modules an import statement loads by name: `from dpojax.a import b` is dpojax.a.b when that is a
    module, else dpojax.a; relative imports are resolved against `module`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "dpojax" or a.name.startswith("dpojax.")]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    if not (base == "dpojax" or base.startswith("dpojax.")):
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _parsed(paths: dict[str, Path]):
    for module, path in paths.items():
        yield module, path, ast.parse(path.read_text(), filename=str(path))


def import_graph() -> dict[str, set[str]]:
    """dpojax module -> the dpojax modules it imports at module level (not under `if TYPE_CHECKING:`)."""
    graph: dict[str, set[str]] = {}
    for module, path, tree in _parsed(MODULES):
        edges = graph.setdefault(module, set())
        for node, scope in _imports(tree):
            if scope == "module":
                edges.update(t for t in _targets(node, module, path.name == "__init__.py") if t != module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_reads_module_level_imports_only():
    graph = import_graph()
    assert "dpojax.data.tokenize" in graph["dpojax.data.loader"]
    assert "dpojax.losses.core" in graph["dpojax.losses.pairwise"]
    assert not graph["dpojax"], "dpojax/__init__.py imports its names lazily (and under TYPE_CHECKING only)"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_function_level_import_detection():
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import dpojax.a\ndef f():\n    from dpojax import glossary\n"
                     "class C:\n    import dpojax.c\n")
    scopes = [(scope, _targets(node, "dpojax.x", False)) for node, scope in _imports(tree)]
    assert scopes == [("module", []), ("type_checking", ["dpojax.a"]), ("function", ["dpojax.glossary"]),
                      ("class", ["dpojax.c"])]


def test_no_function_level_import_of_dpojax():
    """Function- and class-level imports are for heavy optional dependencies (torch, tensorboard, ...), never for
    dpojax's own modules: those are imported at the top of the module that uses them."""
    paths = {**MODULES, **{f"benchmarks.{p.stem}": p for p in sorted((ROOT / "benchmarks").glob("*.py"))}}
    found = []
    for module, path, tree in _parsed(paths):
        for node, scope in _imports(tree):
            if scope in ("function", "class") and _targets(node, module, path.name == "__init__.py"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "function-level imports of dpojax modules: " + ", ".join(found)


# ----------------------------------------------------------------------------------------------- shape suffixes
# A shape suffix follows the last underscore of a name whose stem is not empty (`ids_BxT`, `W_VxD`): dimensions
# joined by "x". A dimension is the literal 1 (an axis kept at size one) or one or more letters, a product when
# there are several (`SR`: S * R). A letter is an uppercase letter followed by lowercase letters or digits (other
# than "x"), as the glossary lists it (`T`, `Dh`), or a single lowercase letter: one device's shard of that
# dimension (`b` of B, inside shard_map). A suffix holds at least one uppercase letter; names in capitals
# (constants such as `PAD_SEGMENT`) carry no shape.
_LETTER = r"(?:[A-Z][a-wyz0-9]*|[a-wyz])"
_DIM = rf"(?:1|{_LETTER}+)"
_SUFFIX = re.compile(rf"^{_DIM}(?:x{_DIM})*$")


def shape_letters(name: str) -> list[str] | None:
    """The letters of `name`'s shape suffix, or None when it has none."""
    stem, sep, suffix = name.rpartition("_")
    if not sep or not stem.strip("_") or name.isupper() or not re.search("[A-Z]", suffix):
        return None
    if not _SUFFIX.match(suffix):
        return None
    return [letter.upper() if letter.islower() else letter
            for dim in suffix.split("x") for letter in re.findall(_LETTER, dim)]


def test_shape_letters_grammar():
    assert shape_letters("ids_BxT") == ["B", "T"]
    assert shape_letters("q_BxTxHxDh") == ["B", "T", "H", "Dh"]
    assert shape_letters("scores_BxGxSRxE") == ["B", "G", "S", "R", "E"]
    assert shape_letters("mask_Bx1xSx1xE") == ["B", "S", "E"]
    assert shape_letters("q_bxTxhxDh") == ["B", "T", "H", "Dh"]
    assert shape_letters("W_VxD") == ["V", "D"]
    assert shape_letters("sums_NxKp1") == ["N", "Kp1"]
    for name in ("_Agreement", "PAD_SEGMENT", "x_2d", "num_layers", "HeadSpec", "seq_len", "row_"):
        assert shape_letters(name) is None, name


def _identifiers(tree: ast.AST):
    for node in ast.walk(tree):
        for attr in ("id", "arg", "name", "attr"):
            value = getattr(node, attr, None)
            if isinstance(value, str):
                yield value, node


def test_shape_suffixes_use_glossary_letters():
    unknown = {}
    for _, path, tree in _parsed(MODULES):
        for name, node in _identifiers(tree):
            bad = [letter for letter in shape_letters(name) or () if letter not in LETTERS]
            if bad:
                unknown.setdefault(f"{path.relative_to(ROOT)} {name} ({', '.join(bad)})", getattr(node, "lineno", 0))
    assert not unknown, "shape letters not in dpojax.glossary.LETTERS:\n" + "\n".join(
        f"{where.split()[0]}:{line} {where.split(' ', 1)[1]}" for where, line in sorted(unknown.items()))
