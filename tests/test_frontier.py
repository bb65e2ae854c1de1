"""`fedistill frontier` end to end on a tiny setting, and what the free steps cost the sites: nothing."""

import json
import subprocess
import sys

from fedistill.inprocess import federate
from common.config import load_config


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
