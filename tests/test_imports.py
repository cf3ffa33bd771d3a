"""evatok/ is plain PyTorch: no file in it imports the distributed/cloud stack."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

EVATOK = Path(__file__).resolve().parents[1] / "evatok"
FORBIDDEN = {"ray", "deepspeed", "mlflow", "fsspec", "s3fs", "boto3", "botocore"}


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level package of every import, anywhere in the file (module, function or class body)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def test_finder_sees_every_import_form():
    src = "import ray.data\nfrom mlflow import x\ndef f():\n    import boto3\nimportlib.import_module('s3fs.core')\n"
    assert imported_modules(ast.parse(src)) == {"ray", "mlflow", "boto3", "s3fs"}


def test_evatok_never_imports_the_distributed_stack():
    files = sorted(EVATOK.rglob("*.py"))
    assert len(files) >= 2
    bad = {}
    for f in files:
        found = imported_modules(ast.parse(f.read_text(), filename=str(f))) & FORBIDDEN
        if found:
            bad[str(f.relative_to(EVATOK.parent))] = sorted(found)
    if bad:
        pytest.fail(f"evatok/ must stay plain PyTorch; forbidden imports: {bad}")
