"""Both Flower apps finish the imports that race between threads before they do anything else."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["server", "client"])
def test_importing_an_app_package_first_imports_what_two_threads_would_race_for(package):
    check = (f"import sys; import {package}; "
             "missing = [m for m in ('opacus', 'torch._dynamo', 'torch.distributed._shard.sharded_tensor') "
             "if m not in sys.modules]; print(missing); sys.exit(bool(missing))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
