"""End to end: `fedistill simulate task=lm` on real Flower processes, with a tiny Llama teacher
built in the test, in both exchange modes; the second (the logits exchange) reads the teacher's
cache the first filled, and the exported students load with transformers and generate."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.public_outputs import TEACHER_WEIGHTS
from tests.conftest import lm_settings
from tests.test_simulate import finished_run, simulate

pytestmark = pytest.mark.e2e  # real Flower simulations

RUN_FILES = ["config.yaml", "metrics.jsonl", "summary.json", "student/config.json", "student/model.safetensors",
             "student/tokenizer.json", "student-int8.pt", "privacy.json", "privacy.md", "progress.png"]


WEIGHTS, LOGITS = ["exchange=weights"], ["exchange=logits", "exchange.choose_teacher_weight=true"]


@pytest.fixture(scope="module")
def weights_run(tiny_lm_teacher, tmp_path_factory):
    """The weights-exchange federation on a teacher cache of its own, which it fills: (folder, overrides, result)."""
    root = tmp_path_factory.mktemp("lm")
    overrides = [o for o in lm_settings(tiny_lm_teacher, root / "run", root / "cache") if not o.startswith("run_dir=")]
    return root, overrides, simulate(root / "run", *overrides, *WEIGHTS)


@pytest.fixture(scope="module")
def logits_run(weights_run):
    """The logits-exchange federation, a second run on the first's teacher cache: (folder, result,
    the cache's top-k files before it, by name and modification time)."""
    root, overrides, _ = weights_run
    cached = {p.name: p.stat().st_mtime_ns for p in (root / "cache").glob("lm-teacher-topk-*.safetensors")}
    return root / "logits-run", simulate(root / "logits-run", *overrides, *LOGITS), cached


def check_federation(run_dir, result, exchange: list[str]) -> None:
    """Both rounds ran, every run file is there, and the exported student loads with transformers and generates."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = finished_run(run_dir, RUN_FILES, rounds=2)
    assert summary["task"] == "lm" and summary["exchange"] == exchange[0].split("=")[1]
    assert len(summary["privacy"]["sites"]) == 2
    for model in ("teacher", "student", "student_int8"):
        assert {"perplexity", "perplexity_unseen", "agreement", "params", "size_bytes", "tokens_per_s"} <= set(summary[model])
    assert summary["student"]["params"] < summary["teacher"]["params"]
    assert summary["communication"]["bytes_up_per_site_round"] > 0
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"perplexity_site-0", "perplexity_site-1", "perplexity_unseen-wsgiref"} <= set(rounds[-1])
    if "exchange=logits" in exchange:  # the teacher's share, chosen each round on the public next tokens
        assert [r["server"]["teacher_weight"] in TEACHER_WEIGHTS for r in rounds] == [True, True], rounds
    assert "tokens/s" in result.stdout and "held-out perplexity" in result.stdout

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    prompt = tokenizer(["def load(path):\n    with open(path) as f:\n"], return_tensors="pt")
    with torch.no_grad():
        out = student.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]), str)


def test_lm_federation_with_the_weights_exchange_exports_a_student_that_generates(weights_run):
    root, _, result = weights_run
    check_federation(root / "run", result, WEIGHTS)


def test_lm_federation_with_the_logits_exchange_exports_a_student_that_generates(logits_run):
    run_dir, result, _ = logits_run
    check_federation(run_dir, result, LOGITS)


def test_a_second_run_reads_the_teachers_cache_instead_of_recomputing(weights_run, logits_run):
    root, _, first = weights_run
    _, second, cached = logits_run
    assert len(cached) >= 4  # the sites', the public corpus's and the evaluation's top-k
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (root / "cache").glob("lm-teacher-topk-*.safetensors")} == cached
    assert "Teacher top-" in first.stdout + first.stderr
    assert "Teacher top-" not in second.stdout + second.stderr
