"""The package's layering holds: every module imports only what its docstring's "Imports:" line names (and its
own package), every package's modules stay within the package's line, no module imports a command, and no two
files import each other, directly or around a cycle (imports inside functions count)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "contextblip_jax"
COMMANDS = {"train", "evaluate", "predict", "fit", "doctables", "convert.__main__", "benchmark.__main__"}
_IMPORTS_LINE = re.compile(r"^Imports\b[^:\n]*:(.*?)(?:\n\n|\Z)", re.M | re.S)


def module_files(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """Every module by its name relative to the package (`training.step`; a package by its folder's name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """The package's modules `path` imports anywhere in its code, by relative name."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if name else []
                here = here if is_package else here[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, *([base] if base else [])])
                base = f"contextblip_jax.{base}" if base else "contextblip_jax"
            for alias in node.names:  # a submodule by its own name, anything else as its module
                whole = f"{base}.{alias.name}"
                out.add(whole if whole.removeprefix("contextblip_jax.") in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    relative = {n.removeprefix("contextblip_jax.") for n in out if n.startswith("contextblip_jax.")}
    return {n for n in relative if n in known and n != name}


def declared(path: pathlib.Path, known: set[str]) -> set[str] | None:
    """The names in backticks on the module docstring's "Imports" line; None when it has no such line. A name
    that is not a module or package of the project is an error: the line must stay checkable."""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    match = _IMPORTS_LINE.search(docstring)
    if match is None:
        return None
    names = {token.removesuffix(".py").replace("/", ".") for token in re.findall(r"`([^`]+)`", match.group(1))}
    unknown = sorted(names - known)
    assert not unknown, f"{path}: the Imports line names {unknown}, which are not modules of the package"
    return names


def allowed(dependency: str, names: set[str]) -> bool:
    return any(dependency == n or dependency.startswith(f"{n}.") for n in names)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def violations(root: pathlib.Path = PACKAGE) -> list[str]:
    """Every breach of the layering under `root`, one line each (empty when it holds)."""
    files = module_files(root)
    known = set(files) - {""}
    graph = {name: imported(path, name, known) for name, path in files.items()}
    problems = []
    for name, path in files.items():
        if not name:
            continue
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        names = declared(path, known)
        if names is None:
            problems.append(f"{name}: its docstring has no Imports line")
            continue
        outside = {d for d in graph[name] if not own_package or not allowed(d, {own_package})}
        problems += [f"{name} imports {d}, which its Imports line does not name" for d in sorted(outside - {
            d for d in outside if allowed(d, names)})]  # fmt: skip
        problems += [f"{name} imports the command {d}" for d in sorted(graph[name] & COMMANDS)]
        package = name.partition(".")[0]
        if "." in name and package in files and path.name != "__init__.py":
            layer = declared(files[package], known) or set()
            wider = sorted(n for n in names if not allowed(n, {package}) and not allowed(n, layer))
            problems += [f"{name}'s Imports line names {n}, outside its package's line" for n in wider]
    if found := cycle(graph):
        problems.append("import cycle: " + " -> ".join(found))
    return problems


def test_every_module_keeps_to_its_imports_line_and_no_file_cycle_exists():
    assert violations() == []


@pytest.fixture()
def package_copy(tmp_path) -> pathlib.Path:
    copy = tmp_path / "contextblip_jax"
    for path in module_files().values():
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return copy


def test_a_cycle_made_by_a_function_level_import_is_found(package_copy):
    storage = package_copy / "storage.py"
    storage.write_text(storage.read_text() + "\n\ndef _late():\n    from contextblip_jax import losses\n")
    losses = package_copy / "losses.py"
    losses.write_text(losses.read_text() + "\n\ndef _later():\n    from contextblip_jax import storage\n")
    found = violations(package_copy)
    assert any(line.startswith("import cycle: ") and "losses" in line and "storage" in line for line in found)
    assert "storage imports losses, which its Imports line does not name" in found


def test_a_model_importing_the_mesh_layer_breaks_its_line(package_copy):
    vit = package_copy / "models" / "vit.py"
    vit.write_text(vit.read_text() + "\nfrom contextblip_jax import parallel\n")
    assert "models.vit imports parallel, which its Imports line does not name" in violations(package_copy)
