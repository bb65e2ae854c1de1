"""The process that runs Flower for `fedistill simulate` holds no model stack while the sites train, and
a run whose Ray node did not start is submitted once more, and once only."""

import subprocess
import sys

import fedistill.simulation as simulation
from fedistill.cli import APP_DIR


def test_the_simulation_runner_imports_no_torch():
    check = "import sys, fedistill.simulation; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, "fedistill.simulation imports torch" + result.stderr


def flower_that_prints(outputs: list[str]):
    """In place of `flwr run`: each run echoes the next of `outputs` and exits 0, as flwr does after a crash."""
    runs = []

    def run_streaming(command, *, env, log, echo):
        echo(outputs[len(runs)])
        runs.append(command)
        return 0

    return run_streaming, runs


RAY_LINE = ("An exception occured!! The current node timed out during startup. This could happen because some of "
            "the raylet failed to startup or the GCS has become overloaded.")


def submit(tmp_path, monkeypatch, outputs: list[str]) -> list:
    fake, runs = flower_that_prints(outputs)
    monkeypatch.setattr(simulation, "run_streaming", fake)
    link = simulation.SimulationSuperLink(tmp_path)  # not entered: no SuperLink process is needed here
    shown = []
    assert link.run(APP_DIR, tmp_path / "run_config.toml", num_supernodes=2, cpus_per_site=1, echo=shown.append) == 0
    assert shown == outputs[:len(runs)]  # every line still reaches the caller
    return runs


def test_a_run_whose_ray_did_not_start_is_submitted_once_more_and_says_so(tmp_path, monkeypatch, capsys):
    runs = submit(tmp_path, monkeypatch, [RAY_LINE, "ERROR the ServerApp raised", "never reached"])
    assert len(runs) == 2 and runs[0] == runs[1]
    err = capsys.readouterr().err
    assert "Ray did not start within its fixed 30 s" in err and "submitting the run again" in err


def test_ray_is_given_two_starts_at_most_and_other_failures_none_more(tmp_path, monkeypatch, capsys):
    assert len(submit(tmp_path, monkeypatch, [RAY_LINE] * 5)) == simulation.RAY_START_ATTEMPTS == 2
    assert "submitting the run again" in capsys.readouterr().err
    assert len(submit(tmp_path, monkeypatch, ["ERROR the ServerApp raised", "never reached"])) == 1
