"""The LM benchmark's rows and targets, and a row measured end to end on the tiny teacher."""

from __future__ import annotations

import argparse

from fedistill.inprocess import task_key
from bench.lm_bench import (CROSS_ENTROPY, LOGITS, PRUNED, PRUNED_PUBLIC, PUBLIC, TEACHER, costs, lm_settings, rows_for,
                            setting_overrides, targets)
from common.config import load_config


def test_every_row_the_issue_asks_for():
    settings = lm_settings(["3", "8"])
    assert [(n, e) for n, e, _ in settings[:2]] == [("teacher", "-"), (PUBLIC, "-")]
    for name in (TEACHER, CROSS_ENTROPY):
        assert [eps for n, eps, _ in settings if n == name] == ["3", "8", "no DP"], name
    cross_entropy = next(extra for name, eps, extra in settings if name == CROSS_ENTROPY and eps == "8")
    assert "distill.alpha=0" in cross_entropy and "privacy.epsilon=8" in cross_entropy
    assert [eps for n, eps, _ in settings if n == LOGITS] == ["8"]
    assert [eps for n, eps, _ in settings if n == PRUNED] == ["3", "8", "no DP"]
    assert all("student=pruned" in extra for n, _, extra in settings if n in (PRUNED, PRUNED_PUBLIC))
    assert "no DP" not in [eps for _, eps, _ in lm_settings(["3"], without_dp=False)]
    for _, _, extra in settings:
        config = load_config(["task=lm", *extra, "seed=1"])
        other = [o.replace("privacy.epsilon=8", "privacy.epsilon=3") for o in extra]
        assert task_key(config) == task_key(load_config(["task=lm", *other, "seed=1"]))  # one task per setting


def _row(setting, eps, perplexity, std=0.5):
    return {"setting": setting, "epsilon": eps, "perplexity": perplexity, "perplexity_std": std}


COST = {"teacher": {"params": 2000, "tokens_per_s": 100.0, "non_embedding_params": 1600},
        "student": {"params": 120, "tokens_per_s": 900.0},
        "pruned student": {"params": 800, "tokens_per_s": 300.0, "non_embedding_params": 420}}


def test_the_pruned_rows_take_their_own_student_overrides():
    run = ["task=lm", "student.dim=16", "rounds=2"]
    assert setting_overrides(run, ["privacy=none"], ["student.layers=1"]) == [*run, "privacy=none"]
    assert setting_overrides(run, ["student=pruned"], ["student.layers=1"]) == [
        "task=lm", "rounds=2", "student.layers=1", "student=pruned"]


def test_targets_show_their_margins_met_or_missed():
    rows = [_row(PUBLIC, "-", 20.0), _row(TEACHER, "8", 18.0, 1.0), _row(CROSS_ENTROPY, "8", 18.4, 0.2)]
    checks = {t["target"]: t for t in targets(rows, COST)}
    assert checks["student parameters <= teacher / 20"]["margin"] == -20 and not checks["student parameters <= teacher / 20"]["met"]
    speed = checks["student >= 10x the teacher's tokens/s, 1 thread"]
    assert abs(speed["value"] - 9.0) < 1e-9 and not speed["met"]
    public = next(t for name, t in checks.items() if name.startswith("epsilon 8 federation below public-only"))
    assert abs(public["margin"] - (2.0 - 1.0)) < 1e-9 and public["met"]
    teacher = next(t for name, t in checks.items() if name.startswith("teacher below cross-entropy only"))
    assert abs(teacher["margin"] - (0.4 - 1.0)) < 1e-9 and not teacher["met"]
    quarter = checks["pruned student: non-embedding parameters <= teacher's / 4"]
    assert quarter["margin"] == -20 and not quarter["met"]
    pruned = [_row(TEACHER, "3", 40.0), _row(PRUNED, "3", 19.0, 0.5), _row(PRUNED, "8", 17.0, 1.5), _row("teacher", "-", 9.0)]
    checks = {t["target"]: t for t in targets(pruned, COST)}
    half = checks["pruned student at eps 3: perplexity <= half the from-scratch student's"]
    assert (half["value"], half["bar"], half["margin"], half["met"]) == (19.0, 20.0, 1.0, True)
    differ = next(t for name, t in checks.items() if name.startswith("pruned student: epsilon 3 and 8 differ"))
    assert abs(differ["margin"] - (2.0 - 1.5)) < 1e-9 and differ["met"]
    near = checks["pruned student at eps 8: perplexity within 2x the teacher's"]
    assert near["margin"] == 1.0 and near["met"]


def test_rows_are_measured_on_the_tiny_teacher(lm_overrides, capsys):
    overrides = [o for o in lm_overrides if not o.startswith(("run_dir=", "cache_dir="))]
    cache = next(o.split("=", 1)[1] for o in lm_overrides if o.startswith("cache_dir="))
    pruned = ["student.layers=1", "student.budget=0.6"]  # the tiny teacher has two layers
    args = argparse.Namespace(seeds=2, only=["teacher", "public", "DP federation, with", "DP federation, pruned"],
                              pruned=pruned)
    settings = [s for s in lm_settings(["8"]) if s[1] in ("-", "8")]
    rows = rows_for(settings, overrides, cache, args, lambda rows: None)
    assert [(r["setting"], r["epsilon"]) for r in rows] == [("teacher", "-"), (PUBLIC, "-"), (TEACHER, "8"),
                                                            (PRUNED_PUBLIC, "-"), (PRUNED, "8")]
    for r in rows:
        assert r["seeds"] == 2 and r["perplexity"] > 1 and 0 <= r["agreement"] <= 1
        assert {"perplexity_unseen", "perplexity_site-0", "perplexity_site-1"} <= set(r)
    assert rows[0]["bytes_up_per_site_round"] is None and rows[2]["bytes_up_per_site_round"] > 0
    cost = costs(overrides, cache, pruned)
    assert cost["student"]["params"] < cost["teacher"]["params"] and cost["int8 student"]["tokens_per_s"] > 0
    assert 0 < cost["pruned student"]["non_embedding_params"] <= 0.6 * cost["teacher"]["non_embedding_params"]
