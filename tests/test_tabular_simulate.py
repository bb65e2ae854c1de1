"""End to end: `fedistill simulate task=tabular` on real Flower processes, exporting a student that
classifies the table's rows with the encoding saved beside it; the logits exchange of the same
federation in-process (the same site round and server exchange, without Flower's processes)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_model

from common.config import load_config
from common.models.image import StudentMLP
from common.tasks.table_encoding import Encoding
from tests.common.test_tabular_task import table
from fedistill.inprocess import federate
from tests.test_simulate import finished_run, simulate

pytestmark = pytest.mark.e2e

RUN_FILES = ["config.yaml", "metrics.jsonl", "summary.json", "student.safetensors", "student.json",
             "student-int8.pt", "privacy.json", "privacy.md", "progress.png"]


def federation(data, cache_dir) -> list[str]:
    table(1500).to_csv(data, index=False)
    return ["task=tabular", f"task.data.path={data}", "task.data.label=outcome", "sites=2", "rounds=2",
            "task.teacher.max_iter=50", "exchange.server.transfer=200", f"cache_dir={cache_dir}"]


def test_tabular_federation_runs_and_exports_a_student_with_its_encoding(tmp_path, cache_dir):
    data = tmp_path / "survey.csv"
    run_dir = tmp_path / "run"
    result = simulate(run_dir, *federation(data, cache_dir), "exchange=weights")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = finished_run(run_dir, RUN_FILES, rounds=2)
    assert summary["task"] == "tabular" and summary["teacher"]["accuracy"] > 0.8
    assert summary["student"]["accuracy"] > 0.6  # three classes: chance is a third

    saved = json.loads((run_dir / "student.json").read_text())
    encoding = Encoding(**saved["encoding"])
    student = StudentMLP((saved["num_features"],), saved["num_classes"], saved["hidden"])
    load_model(student, run_dir / "student.safetensors")
    rows = pd.read_csv(data).head(200)
    with torch.no_grad():
        predicted = student(encoding.features(rows, where="rows")).argmax(1)
    assert (predicted == encoding.labels(rows, where="rows")).float().mean() > 0.6


def test_the_logits_exchange_trains_a_tabular_student(tmp_path, cache_dir):
    config = load_config([*federation(tmp_path / "survey.csv", cache_dir), "exchange=logits", f"run_dir={tmp_path / 'run'}"])
    scores, wire = federate(config, dp_seed=0)
    assert scores["accuracy"] > 0.6  # three classes: chance is a third
    assert all(0 < epsilon <= config.privacy.epsilon for epsilon in wire["epsilon"]) and len(wire["epsilon"]) == 2
