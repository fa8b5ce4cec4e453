"""kt_edge_runtime runs on JetPack 5's Python 3.8: no newer syntax or library calls, checked by vermin."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

EXPORT = Path(__file__).resolve().parents[2] / "export"  # the source tree: an installed copy has no pyproject
PACKAGE = EXPORT / "kt_edge_runtime"
PYPROJECT = EXPORT / "pyproject.toml"


def test_runtime_needs_nothing_newer_than_python_3_8():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, vermin; sys.argv[0] = 'vermin'; sys.exit(vermin.main())",
            "--target=3.8-",
            "--no-tips",
            "--violations",
            "--no-parse-comments",
            str(PACKAGE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_annotations_stay_unevaluated_where_python_3_8_cannot_read_them():
    """`list[int]` and `X | None` are 3.9/3.10 syntax at run time; PEP 563 keeps them strings."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        annotated = any(
            isinstance(node, ast.AnnAssign)
            or (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and (node.returns is not None or any(a.annotation is not None for a in node.args.args))
            )
            for node in ast.walk(tree)
        )
        future = any(
            isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
            for n in tree.body
        )
        assert future or not annotated, f"{path.name} needs `from __future__ import annotations`"


def test_pyproject_installs_on_python_3_8():
    text = PYPROJECT.read_text()
    assert 'requires-python = ">=3.8"' in text
    assert 'license = "' not in text  # an SPDX string needs setuptools >= 77, which needs Python >= 3.9
