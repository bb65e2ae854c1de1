"""A run's saved state: what `resume=` restores is what the run had after its saved round."""

import json

import pytest
import torch

from common.config import ConfigError, load_config
from common.storage import save_model
from common.tasks import build_task
from server import resume
from server.report import PrivacyView, privacy_report
from server.resume import Progress, SavedRun
from server.rounds import RoundEngine, RoundOutcome, SiteOutcome, TRAINED


@pytest.fixture
def logits_run(tmp_path, cache_dir):
    config = load_config(["task=digits", "sites=4", "rounds=5", "exchange=logits", f"run_dir={tmp_path}",
                          f"cache_dir={cache_dir}"])
    task = build_task(config)

    def engine() -> RoundEngine:
        return RoundEngine.for_run(config, task, task.student(config.student))
    return config, engine


def test_a_saved_round_restores_the_student_plan_consensus_and_rng(tmp_path, logits_run):
    config, new_engine = logits_run
    engine = new_engine()
    engine.plan.sample(1, [5, 6, 7, 8])
    engine.rounds = {1: RoundOutcome(), 2: RoundOutcome(failed="0 valid replies")}
    engine.exchange.consensus = {"probs": torch.rand(3, 10)}
    (tmp_path / "checkpoints").mkdir()
    save_model(tmp_path / "checkpoints" / "round-002.safetensors", engine.global_student)
    progress = Progress(rounds=[{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.5}], scores={"accuracy": 0.5},
                        runs=[17])
    progress.privacy.epsilon = {"site-0": float("inf")}
    torch.manual_seed(123)
    resume.save(tmp_path, 2, overrides=config.overrides, engine=engine, progress=progress)
    expected_draw = torch.rand(4)

    restored = new_engine()  # another initialisation, another plan
    saved = SavedRun.read(tmp_path)
    saved.restore(restored)
    assert saved.round == 2 and saved.overrides == config.overrides
    for name, value in engine.global_student.state_dict().items():
        assert torch.equal(restored.global_student.state_dict()[name], value)
    assert restored.plan.nodes == engine.plan.nodes and restored.plan.sampled == engine.plan.sampled
    assert torch.equal(restored.exchange.consensus["probs"], engine.exchange.consensus["probs"])
    assert torch.equal(torch.rand(4), expected_draw)  # torch's generator as it was when the round was saved
    back = saved.progress()
    assert back.rounds == progress.rounds and back.runs == [17] and back.privacy.epsilon == {"site-0": float("inf")}


def test_resume_takes_the_runs_own_overrides_and_refuses_any_other_a_moved_folder_and_a_finished_run(tmp_path):
    saved = SavedRun(tmp_path, 2, ["task=digits", "rounds=4", f'run_dir="{tmp_path}"'], {})
    assert saved.overrides_for([f"resume={tmp_path}"]) == ["task=digits", "rounds=4", f'run_dir="{tmp_path}"',
                                                           f'resume="{tmp_path}"']
    assert saved.overrides_for(["task=digits", "rounds=4", f"resume={tmp_path}"])[:2] == ["task=digits", "rounds=4"]
    assert load_config(saved.overrides_for([])).resume == str(tmp_path)  # quoted for Hydra, read back as the path
    with pytest.raises(ConfigError, match="rounds=6 would change it midway"):
        saved.overrides_for(["rounds=6", f"resume={tmp_path}"])
    moved = SavedRun(tmp_path, 2, ["task=digits", 'run_dir="/where/it/was/made"'], {})
    with pytest.raises(ConfigError, match="has been moved; move it back"):
        moved.overrides_for([])
    saved.check_rounds_left(3)  # round 3 is left
    with pytest.raises(ConfigError, match="already completed all its 2 rounds"):
        saved.check_rounds_left(2)


@pytest.mark.parametrize("text, message", [
    ("{", "cannot be read"),
    (json.dumps({"version": 99, "round": 1, "overrides": []}), "version 99"),
    (json.dumps({"version": 1, "overrides": []}), "cannot be read"),
])
def test_an_unreadable_state_is_refused_with_what_to_do(tmp_path, text, message):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "state.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        SavedRun.read(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        SavedRun.read(tmp_path / "nowhere")


def test_a_resumed_runs_report_keeps_each_sites_spend_before_the_resume(tmp_path):
    view = PrivacyView()
    view.update(1, RoundOutcome(sites=[SiteOutcome("site-0", 1, TRAINED, epsilon_spent=0.8, epsilon_budget=2.0)]))
    view.begin_part()
    view.update(2, RoundOutcome(sites=[SiteOutcome("site-0", 2, TRAINED, epsilon_spent=0.5, epsilon_budget=2.0)]))
    config = load_config(["task=digits"])
    site = view.summary(config)["sites"][0]
    assert site["epsilon"] == 0.5 and site["epsilon_earlier_parts"] == [0.8] and site["rounds_trained"] == 2
    assert "This run was resumed" in privacy_report(view.summary(config))
    fresh = PrivacyView()
    fresh.update(1, RoundOutcome(sites=[SiteOutcome("site-0", 1, TRAINED, epsilon_spent=0.8, epsilon_budget=2.0)]))
    assert "resumed" not in privacy_report(fresh.summary(config))
