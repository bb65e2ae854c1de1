"""The server's warm start: distillation on the public inputs before round 1, at no privacy cost."""

from __future__ import annotations

import torch

from common.config import load_config
from common.public_distill import TeacherTransfer
from common.tasks import build_task


def test_warm_start_teaches_a_classifier_from_the_teachers_soft_labels(cache_dir):
    config = load_config(["task=digits", "task.split.public=0.3", f"cache_dir={cache_dir}"])
    task = build_task(config)
    evaluator = task.evaluator()
    torch.manual_seed(0)
    student = task.student(config.student)
    before = evaluator(student)["accuracy"]
    TeacherTransfer(task, config.distill, config.exchange.server, seed=0).fit(student, seed=0)
    assert evaluator(student)["accuracy"] > before + 0.3


def test_warm_start_of_a_causal_lm_uses_the_public_next_tokens(lm_overrides):
    config = load_config(lm_overrides + ["distill.alpha=0", "exchange.server.epochs=20"])
    task = build_task(config)
    assert task.public_labels().shape == task.public_inputs().shape
    evaluator = task.evaluator()
    torch.manual_seed(0)
    student = task.student(config.student)
    before = evaluator(student)["perplexity"]
    report = TeacherTransfer(task, config.distill, config.exchange.server, seed=0).fit(student, seed=0)
    assert report.epochs >= 1 and evaluator(student)["perplexity"] < before
