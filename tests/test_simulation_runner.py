"""The process that runs Flower for `fedistill simulate` holds no model stack while the sites train."""

import subprocess
import sys


def test_the_simulation_runner_imports_no_torch():
    check = "import sys, fedistill.simulation; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, "fedistill.simulation imports torch" + result.stderr
