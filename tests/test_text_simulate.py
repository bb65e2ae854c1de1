"""End to end: `fedistill simulate task=text` on real Flower processes, with a tiny BERT-like
teacher built in the test, in both exchange modes with feature distillation on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from common.models.encoder import StudentEncoder
from common.models.inference import quantize_int8
from fedistill.simulation import processes_using

RUN_FILES = ["config.yaml", "metrics.jsonl", "summary.json", "student/config.json", "student/model.safetensors",
             "student/tokenizer.json", "student-int8.pt", "privacy.json", "privacy.md", "progress.png"]


def simulate(run_dir, overrides):
    result = subprocess.run([sys.executable, "-m", "fedistill.cli", "simulate", *overrides, f"run_dir={run_dir}"],
                            capture_output=True, text=True, timeout=900)
    leftovers = processes_using(run_dir)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"processes left running after fedistill exited: {leftovers}"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("exchange", [
    ["exchange=weights"],  # the default student, a bag of embeddings
    ["exchange=logits", "exchange.broadcast=logits", "student=transformer", "exchange.compression=float16",
     "exchange.site_students=[{dim: 16}, {dim: 8, ff: 16}]"],
], ids=["weights", "logits-per-site-students"])
def test_text_federation_runs_two_rounds_and_exports_a_student_that_classifies(text_overrides, tmp_path, exchange):
    run_dir = tmp_path / "text-run"
    overrides = [o for o in text_overrides if not o.startswith("run_dir=")] + exchange
    result = simulate(run_dir, overrides)
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "text" and summary["rounds_completed"] == 2
    assert [s["rounds_trained"] for s in summary["privacy"]["sites"]] == [2, 2]
    for s in summary["privacy"]["sites"]:
        assert 0 < s["epsilon"] <= s["budget"]
    for model in ("teacher", "student", "student_int8"):
        assert {"accuracy", "agreement", "params", "size_bytes", "latency_ms"} <= set(summary[model]), model
    assert summary["student"]["params"] < summary["teacher"]["params"]
    assert "int8 student" in result.stdout and "size on disk" in result.stdout

    student = StudentEncoder.from_pretrained(run_dir / "student")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    ids = tokenizer(["the striker scored a goal in the league match"], padding="max_length",
                    max_length=student.config.max_length, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = student(ids)
    assert student.config.labels[int(logits.argmax())] in {"World", "Sports", "Business", "Sci/Tech"}
    assert student.config.feature_dim == 32  # feature distillation's projection travelled with the student
    int8 = quantize_int8(student)
    int8.load_state_dict(torch.load(run_dir / "student-int8.pt", weights_only=False))
    with torch.no_grad():
        assert int8(ids).argmax() == logits.argmax()
