"""Both Flower apps finish the imports that race between threads before they do anything else,
and their packages import nothing (`flwr run` imports them to check the app's components)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("app", ["server.app", "client.app"])
def test_importing_an_app_first_imports_what_two_threads_would_race_for(app):
    check = (f"import sys; import {app}; "
             "missing = [m for m in ('opacus', 'torch._dynamo', 'torch.distributed._shard.sharded_tensor') "
             "if m not in sys.modules]; print(missing); sys.exit(bool(missing))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    tree = ast.parse((ROOT / f"{app.replace('.', '/')}.py").read_text())
    body = [node for node in tree.body[1:] if not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
    assert isinstance(body[0], ast.Import) and body[0].names[0].name == "common.preload"  # before anything else


def test_the_app_packages_import_no_model_stack():
    check = "import sys, server, client; print(' '.join(m for m in ('torch', 'opacus') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            check=True)
    assert result.stdout.split() == []
