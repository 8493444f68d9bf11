"""The package's import graph: one direction, types included (issue 26).

Every `import` and `from ... import` of `ivdfs/` is read with `ast`, wherever it stands (in a
function, under TYPE_CHECKING): a TYPE_CHECKING import that closes a loop is a sign that a
record sits in the wrong module, even though it costs nothing at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ivdfs"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the package that `name` imports (a package's `__init__` counts only
    when a name is imported from it that is not a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            module = owner(target) if target.startswith("ivdfs") else None
            if module is not None and module != name:
                found.add(module)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_type_checking_imports(tmp_path: Path) -> None:
    """The check reads what it must: a TYPE_CHECKING import inside a module counts."""
    known = {"ivdfs.a": tmp_path / "a.py", "ivdfs.b": tmp_path / "b.py"}
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ivdfs.b import X\n"
    known["ivdfs.a"].write_text(source)
    assert imports("ivdfs.a", known["ivdfs.a"], known) == {"ivdfs.b"}
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_the_package_imports_in_one_direction() -> None:
    edges = graph()
    assert len(edges) > 50 and "ivdfs.tree.nodes" in edges["ivdfs.tree.inodes"]
    assert cycles(edges) == []


# What a module outside vddk/ may not import from it: the binding's declarations (VDDK's
# constants) and whatever carries or reads a VixError code.
VDDK_INTERNALS = {
    "ivdfs.vddk._cdefs": None,
    "ivdfs.vddk._mntapi_cdefs": None,
    "ivdfs.vddk.errors": {"VddkError", "is_permanent", "code_of", "ACCOUNT_CODES"},
}


def vddk_knowledge(path: Path) -> list[str]:
    """Where a module outside vddk/ knows a VixError code or a VDDK constant."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                whole = f"{node.module}.{a.name}"
                banned = VDDK_INTERNALS.get(node.module or "", set())
                if whole in VDDK_INTERNALS or banned is None or a.name in banned:
                    found.append(f"imports {whole}")
        elif isinstance(node, ast.Import):
            found += [f"imports {a.name}" for a in node.names if a.name in VDDK_INTERNALS]
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name.startswith(("VIX_", "VIXDISKLIB_", "VIXMNTAPI_")):
                found.append(f"names {name}")
    where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE) else path.name
    return [f"{where}: {f}" for f in found]


def test_nothing_outside_vddk_knows_a_vixerror_code_or_a_vddk_constant(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from ivdfs.vddk.errors import VddkError, VddkLoadError\n"
        "from ivdfs.vddk import _cdefs\n"
        "if isinstance(e, VddkError) and e.code == _cdefs.VIX_E_NOT_SUPPORTED: pass\n"
    )
    assert [f.split(": ", 1)[1] for f in vddk_knowledge(probe)] == [
        "imports ivdfs.vddk.errors.VddkError",
        "imports ivdfs.vddk._cdefs",
        "names VIX_E_NOT_SUPPORTED",
    ]
    outside = [p for p in PACKAGE.rglob("*.py") if "vddk" not in p.relative_to(PACKAGE).parts]
    assert len(outside) > 50
    assert [f for p in outside for f in vddk_knowledge(p)] == []
