"""`fedistill frontier` end to end on a tiny setting, and what the free steps cost the sites: nothing."""

import json
import subprocess
import sys

import pytest

from common.config import ConfigError, load_config
from fedistill.frontier import Scores, measure
from fedistill.inprocess import federate


def test_the_frontier_command_writes_its_table_figures_and_plot(tmp_path, cache_dir):
    out = tmp_path / "frontier"
    done = subprocess.run([sys.executable, "-m", "fedistill.cli", "frontier", "task=digits", "sites=2", "rounds=1",
                           f"cache_dir={cache_dir}", f"run_dir={out}", "--seeds", "1", "--epsilons", "2", "6"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "frontier.json").read_text())
    assert [p["epsilon"] for p in result["points"]] == [2.0, 6.0] and result["metric"] == "accuracy"
    for point in (*result["points"], result["public_only"], result["no_dp"]):
        assert 0 < point["mean"] <= 1 and len(point["seeds"]) == 1
    assert (out / "frontier.png").stat().st_size > 10_000
    table = (out / "frontier.md").read_text()
    assert "| public only (no site) | - |" in table and "| federation | no DP |" in table
    assert "frontier.png" in done.stdout


def test_the_warm_start_and_the_servers_distillation_spend_no_epsilon(tmp_path, cache_dir):
    """The sites' ledgers hold the same releases whether or not the server distills toward the teacher
    on the public and transfer inputs before and after every round: only public data enters those."""
    def ledgers(free: str) -> list:
        config = load_config(["task=digits", "sites=2", "rounds=2", f"cache_dir={cache_dir}",
                              f"run_dir={tmp_path / free}", f"exchange.server.warm_start={free}",
                              f"exchange.server.distill_teacher={free}"])
        _, wire = federate(config)
        files = sorted((tmp_path / free / "ledger").glob("*/ledger.json"))
        return [[(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in json.loads(p.read_text())["entries"]]
                for p in files] + [wire["epsilon"]]

    plain, free = ledgers("false"), ledgers("true")
    assert len(plain) == 3 and all(len(site) == 2 for site in plain[:2])  # two sites, two DP rounds each
    assert free == plain


def test_a_frontier_started_again_measures_only_what_is_missing(tmp_path, cache_dir):
    """Every federation's score is kept as it ends; a cut-short federation is measured again in a
    folder of its own (its sites' ledgers are never reused), and another request is refused."""
    overrides = ["task=digits", "sites=2", "rounds=1", f"cache_dir={cache_dir}"]
    request = {"overrides": overrides, "epsilons": [2.0], "seeds": 1}
    out = tmp_path / "frontier"
    (out / "runs" / "no-dp-seed0" / "ledger").mkdir(parents=True)  # the federation that was cut short
    lines = [{"request": request}, {"point": "public only", "seed": 0, "value": 0.25, "seconds": 1.0},
             {"point": "epsilon 2", "seed": 0, "value": 0.5, "seconds": 2.0}]
    (out / "scores.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    result = measure(overrides, epsilons=[2.0], seeds=1, out=out)

    assert result["public_only"]["seeds"] == [0.25] and result["points"][0]["seeds"] == [0.5]
    assert 0 < result["no_dp"]["mean"] <= 1
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["no-dp-seed0", "no-dp-seed0-try2"]
    assert not any((out / "runs" / "no-dp-seed0" / "ledger").iterdir())
    saved = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [line.get("point") for line in saved[1:]] == ["public only", "epsilon 2", "no DP"]
    assert result["seconds"] >= 3.0
    with pytest.raises(ConfigError, match="another request"):
        measure(overrides, epsilons=[3.0], seeds=1, out=out)


def test_a_frontier_refuses_a_folder_that_holds_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no frontier"):
        Scores(tmp_path, {"overrides": [], "epsilons": [1.0], "seeds": 1})
    (tmp_path / "scores.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="is not a frontier's progress"):
        Scores(tmp_path, {"overrides": [], "epsilons": [1.0], "seeds": 1})
