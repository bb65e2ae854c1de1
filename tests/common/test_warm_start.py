"""The server's warm start: distillation on the public inputs before round 1, at no privacy cost,
fitted once per teacher, public set and settings, then read from the cache."""

from __future__ import annotations

import torch

from common import public_distill
from common.config import load_config
from common.public_distill import TeacherTransfer, initial_student, warm_start_key
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


def test_a_second_warm_start_reads_the_cache_and_leaves_the_generator_where_the_first_did(tmp_path):
    config = load_config(["task=digits", "exchange.server.epochs=3", f"cache_dir={tmp_path}"])
    task = build_task(config)
    fitted, report = initial_student(task, config)
    after_fit = torch.get_rng_state()
    assert not report.cached and len(list(tmp_path.glob("warm-start-*.safetensors"))) == 1
    cached, again = initial_student(task, config)
    assert again.cached and (again.epochs, again.holdout_loss) == (report.epochs, report.holdout_loss)
    assert torch.equal(torch.get_rng_state(), after_fit)  # the fit draws from its own generator: a cached start changes no later draw
    for name, tensor in fitted.state_dict().items():
        assert torch.equal(tensor, cached.state_dict()[name]), name
    torch.manual_seed(config.seed)
    untrained = task.student(config.student)
    assert any(not torch.equal(t, untrained.state_dict()[n]) for n, t in cached.state_dict().items())


def test_the_cache_key_follows_what_the_warm_start_depends_on_and_nothing_else(tmp_path, monkeypatch):
    base = ["task=digits", f"cache_dir={tmp_path}"]
    config = load_config(base)
    task = build_task(config)
    key = warm_start_key(task, config)
    for changed in (["seed=1"], ["distill.temperature=2"], ["exchange.server.epochs=7"], ["student.hidden=[8]"]):
        assert warm_start_key(task, load_config(base + changed)) != key, changed
    for unrelated in (["sites=7"], ["rounds=9"], ["distill.lr=0.5"], ["privacy.epsilon=1"]):
        assert warm_start_key(task, load_config(base + unrelated)) == key, unrelated
    monkeypatch.setattr(public_distill, "WARM_START_VERSION", public_distill.WARM_START_VERSION + 1)
    assert warm_start_key(task, config) != key
    monkeypatch.undo()
    monkeypatch.setattr(type(task), "teacher_digest", lambda self: "another teacher at the same path")
    assert warm_start_key(task, config) != key
