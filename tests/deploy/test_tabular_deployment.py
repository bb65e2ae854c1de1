"""task=tabular in a real deployment on 127.0.0.1: two sites with a table of their own records,
their task settings in their site files, the coordinator with its own copy of the shared table."""

from __future__ import annotations

import json

import pytest

from fedistill.loopback import LoopbackDeployment
from tests.common.test_tabular_task import table

pytestmark = pytest.mark.e2e

SITES = ("site-a", "site-b")


def test_a_tabular_federation_runs_on_sites_holding_their_own_tables(tmp_path, cache_dir):
    shared = tmp_path / "shared.csv"  # the table every site and the coordinator hold (teacher, public, test)
    table(1200).to_csv(shared, index=False)
    task = {"data": {"path": str(shared), "label": "outcome"}, "teacher": {"max_iter": 50}}
    sites = {}
    for index, name in enumerate(SITES):
        records = tmp_path / f"{name}.csv"
        table(300, seed=10 + index).to_csv(records, index=False)
        sites[name] = {"epsilon": 8.0, "delta": 1e-5, "cache_dir": cache_dir, "task_sources": ["tabular"],
                       "data_path": str(records), "reply_after_s": 0, "task": task, "allow_unpinned_apps": True}
    with LoopbackDeployment(tmp_path / "deployment", sites) as deployment:
        done = deployment.submit("task=tabular", f"task.data.path={shared}", "task.data.label=outcome",
                                 "task.teacher.max_iter=50", "rounds=1", "federation.min_sites=2",
                                 "exchange.server.transfer=200", "privacy.epsilon=3")
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads((deployment.runs()[-1] / "summary.json").read_text())
    assert summary["task"] == "tabular" and summary["rounds_completed"] == 1
    assert {s["site"]: s["rounds_trained"] for s in summary["privacy"]["sites"]} == {"site-a": 1, "site-b": 1}
    assert all(0 < s["epsilon"] <= 3.0 for s in summary["privacy"]["sites"])
    assert summary["student"]["accuracy"] > 0.5
