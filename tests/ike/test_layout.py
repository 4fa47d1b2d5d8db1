"""The shape of the IKE layer: small classes, and the ESP layer below knowing nothing of it."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "espswitch"
MAX_CLASS_LINES = 400


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            names.append("__import__")
    return names


def test_no_class_over_400_lines_in_ike_and_vswitchd():
    sizes = {}
    for pkg in ("ike", "vswitchd"):
        files = sorted((SRC / pkg).rglob("*.py"))
        assert files, pkg
        for f in files:
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ClassDef):
                    sizes[f"{pkg}/{f.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert "ike/core.py:IkeCore" in sizes
    assert {k: v for k, v in sizes.items() if v > MAX_CLASS_LINES} == {}


def test_ipsec_imports_nothing_from_ike():
    """`ipsec/` is the layer below `ike/`: no import of it, not even a hook it fills."""
    files = sorted((SRC / "ipsec").rglob("*.py"))
    assert len(files) > 5
    for f in files:
        for name in _imports(ast.parse(f.read_text())):
            assert name not in ("__import__", "importlib") and not name.startswith(
                ("espswitch.ike", "espswitch.datapath", "espswitch.vswitchd")), (f.name, name)


def test_importing_ipsec_loads_nothing_of_ike():
    """At run time too: the ESP layer and its option parsing work without the IKE layer."""
    code = ("import sys, espswitch.ipsec, espswitch.ipsec.config; "
            "print(sorted(m for m in sys.modules if m.startswith('espswitch.ike')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    assert out.stdout.strip() == "[]"
