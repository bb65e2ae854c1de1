"""End to end: `fedistill simulate task=text` on real Flower processes, with a tiny BERT-like
teacher built in the test, in both exchange modes with feature distillation on."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoTokenizer

from common.models.encoder import StudentEncoder
from common.models.inference import quantize_int8
from tests.test_simulate import finished_run, simulate

pytestmark = pytest.mark.e2e  # real Flower simulations

RUN_FILES = ["config.yaml", "metrics.jsonl", "summary.json", "student/config.json", "student/model.safetensors",
             "student/tokenizer.json", "student-int8.pt", "privacy.json", "privacy.md", "progress.png"]


@pytest.mark.parametrize("exchange", [
    ["exchange=weights"],  # the default student, a bag of embeddings
    ["exchange=logits", "exchange.broadcast=logits", "student=transformer", "exchange.compression=float16",
     "exchange.site_students=[{dim: 16}, {dim: 8, ff: 16}]"],
], ids=["weights", "logits-per-site-students"])
def test_text_federation_runs_two_rounds_and_exports_a_student_that_classifies(text_overrides, tmp_path, exchange):
    run_dir = tmp_path / "text-run"
    overrides = [o for o in text_overrides if not o.startswith("run_dir=")] + exchange
    result = simulate(run_dir, *overrides)
    summary = finished_run(run_dir, RUN_FILES, rounds=2)
    assert summary["task"] == "text" and len(summary["privacy"]["sites"]) == 2
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
