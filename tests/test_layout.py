"""The layout rules of docs/architecture.md, checked on the source (every import, also those inside functions).

- `runtime` never imports `exporter`, nor torch / transformers / optimum (a phone-side user installs only it);
- nothing outside `exporter.cli` imports `exporter.cli`;
- no import circle between modules;
- `koedge run --help` loads no exporter stage (the CLI's heavy imports happen inside commands).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "exporter")
HEAVY = ("torch", "transformers", "optimum", "peft", "accelerate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module named by an import statement in the file (submodules of `from X import sub` too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in known)
    return names


def graph() -> dict[str, set[str]]:
    modules = sources()
    known = set(modules)
    return {name: imports_of(path, known) for name, path in modules.items()}


def test_runtime_never_imports_exporter_or_the_training_stack():
    for name, imported in graph().items():
        if name.split(".")[0] != "runtime":
            continue
        bad = sorted(i for i in imported if i.split(".")[0] in ("exporter", *HEAVY))
        assert not bad, f"{name} imports {bad}"


def test_only_the_cli_imports_the_cli():
    for name, imported in graph().items():
        if name.startswith("exporter.cli"):
            continue
        bad = sorted(i for i in imported if i == "exporter.cli" or i.startswith("exporter.cli."))
        assert not bad, f"{name} imports {bad}"


def test_no_import_circle():
    imports = graph()
    edges = {name: {i for i in imported if i in imports and i != name} for name, imported in imports.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_circle_check_can_fail(tmp_path):
    """The checker itself: two files importing each other are reported."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    known = {"a", "b"}
    assert imports_of(tmp_path / "a.py", known) == {"b"}
    assert imports_of(tmp_path / "b.py", known) == {"a"}


def test_runtime_commands_load_no_exporter_stage():
    code = ("import sys; from exporter.cli import build_parser; build_parser().parse_args(['run', 'x', 'y']); "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'optimum', 'onnx') or m.startswith(('exporter.export', 'exporter.quantize', "
            "'exporter.build.engine')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert loaded.stdout.strip() == ""
