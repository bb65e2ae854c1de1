"""`fedistill audit`: the one-run bound on fixed score lists computed by hand, the canaries planted
at one site only, and the command end to end on a tiny setting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from common.config import ConfigError, load_config
from fedistill import audit as A
from fedistill import cli


def test_the_bound_of_ten_correct_guesses_of_twenty_canaries_is_the_one_computed_by_hand():
    planted, held_back = np.arange(10, 20.0), np.arange(10.0)  # every planted canary above every held-back one
    # Cut-offs for 20 canaries: 1, 2, 4, 6 and 10 guesses. The best is ten guesses, all right: the
    # p-value at epsilon is sigmoid(epsilon)^10, tested at 0.05 / 5.
    assert A.cut_offs(20) == [1, 2, 4, 6, 10]
    q = (0.05 / 5) ** (1 / 10)
    assert A.epsilon_lower_bound(planted, held_back, delta=0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert A.auc(planted, held_back) == 1.0
    assert A.tpr_at_fpr(planted, held_back) == 1.0


def test_guesses_no_better_than_chance_at_the_corrected_level_give_no_bound():
    # By score: P P P H P H H H P P H H; cut-offs 1, 2, 4 and 6 guesses, each tested at 0.05 / 4.
    # Their p-values at epsilon 0: 0.5, 0.25, P[B(4, 1/2) >= 3] = 5/16, P[B(6, 1/2) >= 4] = 11/32.
    planted = np.array([9.0, 8.0, 7.0, 5.0, 1.0, 0.5])
    held_back = np.array([6.0, 4.0, 3.0, 2.0, 0.0, -1.0])
    assert A.epsilon_lower_bound(planted, held_back, delta=0) == 0.0
    assert A.auc(planted, held_back) == pytest.approx(27 / 36)  # pairs in which the planted one is higher


def test_delta_only_lowers_the_bound():
    planted, held_back = np.arange(30, 60.0), np.arange(30.0)
    without = A.epsilon_lower_bound(planted, held_back, delta=0)
    assert 0 < A.epsilon_lower_bound(planted, held_back, delta=1e-6) < without


def test_the_p_value_with_delta_adds_the_papers_term():
    # Steinke et al.: beta + max_i (P[B >= v - i] - beta) / i * 2 m delta, capped at 1
    m, guesses, correct, eps, delta = 50, 10, 9, 1.0, 1e-4
    q = special.expit(eps)
    beta = stats.binom.sf(correct - 1, guesses, q)
    alpha = max((stats.binom.sf(correct - i - 1, guesses, q) - beta) / i for i in range(1, correct + 1))
    assert A.p_value(m, guesses, correct, eps, delta) == pytest.approx(beta + alpha * delta * 2 * m)


def test_the_canaries_go_to_site_zero_only_and_each_is_planted_or_held_back(small_config):
    from fedistill.inprocess import sites_of, task_of

    config = load_config([*small_config.overrides, "sites=3"])
    canaries = A.Canaries.draw(task_of(config), 40, seed=0)
    assert 0 < canaries.planted.sum() < 40
    sites = sites_of(config)
    planted = A.planted_site(sites[0], canaries)
    assert len(planted.records) == len(sites[0].records) + int(canaries.planted.sum())
    assert planted.name == sites[0].name and planted.index == 0
    inputs = planted.records.tensors[0][len(sites[0].records):]
    assert (inputs == canaries.inputs[canaries.planted]).all()
    assert all(len(s.records) == len(sites_of(config)[i].records) for i, s in enumerate(sites[1:], 1))


def test_every_canary_carries_a_wrong_label(small_config):
    from fedistill.inprocess import task_of

    task = task_of(small_config)
    canaries = A.Canaries.draw(task, 60, seed=1)
    inputs, labels = task.test_data().tensors[:2]
    for x, wrong in zip(canaries.inputs, canaries.labels):
        true = labels[(inputs == x).flatten(1).all(1)][0]
        assert wrong != true


def test_a_shuffled_canary_is_a_held_out_record_with_its_features_reordered_and_a_wrong_label(small_config):
    from fedistill.inprocess import task_of

    task = task_of(small_config)
    plain, shuffled = A.Canaries.draw(task, 60, seed=1), A.Canaries.draw(task, 60, seed=1, kind="shuffled")
    assert torch.equal(plain.labels, shuffled.labels) and (plain.planted == shuffled.planted).all()
    for x, y in zip(plain.inputs, shuffled.inputs):
        assert torch.equal(x.flatten().sort().values, y.flatten().sort().values)  # the same values...
    assert not torch.equal(plain.inputs, shuffled.inputs)  # ...in another order


def test_the_audit_refuses_a_run_without_dp_and_too_many_canaries(small_config, tmp_path):
    with pytest.raises(ConfigError, match="leave privacy=dp"):
        A.audit([*small_config.overrides, "privacy=none"], canaries=20, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="--canaries 5000 is more than half"):
        A.audit(small_config.overrides, canaries=5000, out=tmp_path / "b")


def test_the_audit_command_reports_both_runs_beside_the_accountant_and_plots_them(small_config, tmp_path, capsys):
    out = tmp_path / "audit"
    overrides = [o for o in small_config.overrides if not o.startswith("run_dir=")]
    code = cli.main(["audit", "--canaries", "40", *overrides, "rounds=1", f"run_dir={out}"])
    assert code == 0
    report = json.loads((out / "audit.json").read_text())
    assert set(report["runs"]) == {"DP", "no DP"}
    dp, no_dp = report["runs"]["DP"], report["runs"]["no DP"]
    assert set(dp["views"]) == {"global student", "site 0's replies", "global student, gradient alignment",
                                "site 0's updates, gradient alignment"}
    assert 0 < dp["accountant_epsilon"] <= 3.0 and no_dp["accountant_epsilon"] == math.inf
    for view in dp["views"].values():
        assert view["epsilon_lower_bound"] <= dp["accountant_epsilon"]
        assert len(view["planted_scores"]) + len(view["held_back_scores"]) == 40
    assert (out / "audit.png").stat().st_size > 0 and "attack AUC" in (out / "audit.md").read_text()
    assert "| DP | global student |" in capsys.readouterr().out


def test_gradient_alignment_scores_the_canary_whose_gradient_the_step_took_and_not_another():
    from torch import nn
    from torch.nn import functional as F

    canaries = A.Canaries(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0]), np.array([True, False]))
    before = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(before.weight)
    (gradient,) = torch.autograd.grad(F.cross_entropy(before(canaries.inputs[:1]), canaries.labels[:1]), before.weight)
    after = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        after.weight.copy_(-0.1 * gradient)  # one step down canary 0's loss; canary 1's input is orthogonal to it
    def loss(model, i):
        return F.cross_entropy(model(canaries.inputs[i:i + 1]), canaries.labels[i:i + 1])
    assert canaries.alignment(before, after, loss) == pytest.approx([0.1 * float(gradient.norm()), 0.0])


def test_in_the_logits_exchange_the_site_is_audited_through_the_student_its_rows_rebuild(small_config, tmp_path):
    overrides = [o for o in small_config.overrides if not o.startswith("run_dir=")]
    report = A.audit([*overrides, "exchange=logits", "rounds=1", f"run_dir={tmp_path}"], canaries=40, out=tmp_path)
    for label, run_ in report["runs"].items():
        assert set(run_["views"]) == {"global student", "site 0's replies", "global student, gradient alignment",
                                      "site 0's updates, gradient alignment"}, label
        replies = run_["views"]["site 0's replies"]
        assert len(replies["planted_scores"]) + len(replies["held_back_scores"]) == 40
        assert any(s != 0 for s in replies["planted_scores"])  # the rebuilt student moved from the warm start
    assert all(v["epsilon_lower_bound"] <= report["runs"]["DP"]["accountant_epsilon"]
               for v in report["runs"]["DP"]["views"].values())


def test_a_code_models_canaries_are_unique_lines_cut_as_the_sites_records_are(lm_overrides):
    from fedistill.inprocess import task_of

    task = task_of(load_config(lm_overrides))
    canaries = A.Canaries.draw(task, 30, seed=2, kind=A.canary_kind("lm", None))
    assert canaries.inputs.shape == (30, 32) and canaries.labels.shape == (30, 32)
    assert len({tuple(row.tolist()) for row in canaries.inputs}) == 30  # each line its own
    predicted = (canaries.labels != -100).sum(1)
    assert (predicted >= A.SECRET_LENGTH).all()  # the secret's words are scored, not only the name
    assert 0 < canaries.planted.sum() < 30
    assert len(set(A.unique_lines(200, seed=0))) == 200 and A.unique_lines(5, seed=0) == A.unique_lines(5, seed=0)


def test_a_code_line_scores_its_tokens_log_likelihood_summed_over_the_line():
    from torch.nn import functional as F

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(7, 7)

        def forward(self, ids, attention_mask):
            return self.table(ids)

    model = Bigram()
    inputs = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    labels = torch.tensor([[2, 3, -100, -100], [5, -100, -100, -100]])
    by_hand = -F.cross_entropy(model(inputs, None).transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
    assert torch.allclose(A.label_log_likelihood(model, inputs, labels), by_hand)


def test_a_code_model_takes_code_line_canaries_only():
    assert A.canary_kind("lm", None) == "unique-lines" and A.canary_kind("image", None) == "mislabelled"
    assert A.canary_kind("image", "shuffled") == "shuffled"
    with pytest.raises(ConfigError, match="--canary mislabelled does not fit task kind lm: choose unique-lines"):
        A.canary_kind("lm", "mislabelled")
    with pytest.raises(ConfigError, match="choose mislabelled or shuffled"):
        A.canary_kind("text", "unique-lines")


@pytest.mark.parametrize("exchange", ["weights", "logits"])
def test_the_audit_of_a_code_model_plants_lines_and_keeps_the_dp_bound_under_the_accountant(lm_overrides, tmp_path,
                                                                                            exchange):
    overrides = [o for o in lm_overrides if not o.startswith("run_dir=")]
    report = A.audit([*overrides, "rounds=1", f"exchange={exchange}", f"run_dir={tmp_path}"], canaries=24, out=tmp_path)
    assert report["canary"] == "unique-lines"
    dp = report["runs"]["DP"]
    assert 0 < dp["accountant_epsilon"] <= 3.0 and report["runs"]["no DP"]["accountant_epsilon"] == math.inf
    for label, run_ in report["runs"].items():
        replies = run_["views"]["site 0's replies"]
        assert len(replies["planted_scores"]) + len(replies["held_back_scores"]) == 24, label
        assert any(s != 0 for s in replies["planted_scores"]), label  # the site's step moved its lines' likelihood
    assert all(v["epsilon_lower_bound"] <= dp["accountant_epsilon"] for v in dp["views"].values())
    assert (tmp_path / "audit.png").stat().st_size > 0


def test_the_step_audits_noise_is_the_least_that_keeps_one_round_within_the_runs_epsilon():
    from fedistill import step_audit as S
    from common.accounting import epsilon_of

    sigma = S.noise_for(3.0, 0.128, 21, 1e-5)
    assert epsilon_of([(sigma, 0.128, 21)], delta=1e-5) <= 3.0 < epsilon_of([(sigma * 0.999, 0.128, 21)], delta=1e-5)
    setting = S.RoundSetting.of(load_config(["task=digits", "privacy.epsilon=3"]))
    assert (setting.records, setting.expected_batch_size) == (500, 64)  # the step plan of the default size class
    assert setting.accountant_epsilon() == pytest.approx(3.0, abs=1e-3)


def test_the_step_audits_score_is_the_log_likelihood_ratio_of_the_canarys_steps_by_hand():
    from fedistill import step_audit as S

    coordinates = np.array([[1.2, -0.3], [0.1, 0.4]])  # two steps, two canaries
    q, sigma = 0.25, 2.0
    def step(x):
        return math.log(1 - q + q * math.exp((2 * x - 1) / (2 * sigma ** 2)))
    by_hand = [step(1.2) + step(0.1), step(-0.3) + step(0.4)]
    assert S.likelihood_ratio(coordinates, q, sigma) == pytest.approx(by_hand)
    assert S.likelihood_ratio(coordinates, 1.0, sigma) == pytest.approx([(2 * 1.3 - 2) / 8, (2 * 0.1 - 2) / 8])
    assert S.likelihood_ratio(coordinates, q, 0.0) == pytest.approx([1.3, 0.1])  # no noise: how often sampled


def test_a_planted_gradient_canary_moves_its_own_coordinate_by_the_steps_that_sampled_it():
    from fedistill import step_audit as S

    config = load_config(["task=digits", "privacy.epsilon=3"])
    setting = S.RoundSetting.of(config)
    planted = np.array([True, False] * 50)
    coordinates = S.step_coordinates(setting, config, planted, 0.0)
    assert coordinates.shape == (setting.steps, 100)
    assert set(np.unique(coordinates.round(6))) <= {0.0, 1.0}  # clipped to the norm, divided by the fixed normaliser
    assert (coordinates[:, ~planted] == 0).all() and coordinates[:, planted].mean() == pytest.approx(0.128, abs=0.03)


def test_the_step_audit_stays_under_the_accountant_and_catches_a_step_with_too_little_noise(tmp_path, capsys):
    from fedistill import step_audit as S

    out = tmp_path / "step"
    assert cli.main(["audit", "--step", "task=digits", "privacy.epsilon=1", "--canaries", "1000", f"run_dir={out}"]) == 0
    report = json.loads((out / "audit.json").read_text())
    dp, bare = report["runs"]["DP"], report["runs"]["no noise"]
    assert dp["accountant_epsilon"] == pytest.approx(1.0, abs=1e-3)
    assert dp["views"][S.VIEW]["epsilon_lower_bound"] <= dp["accountant_epsilon"]
    assert bare["views"][S.VIEW]["epsilon_lower_bound"] > 3 * dp["accountant_epsilon"]
    assert (out / "audit.png").stat().st_size > 0 and "noise multiplier" in (out / "audit.md").read_text()
    assert "| DP | every step's update, gradient canaries |" in capsys.readouterr().out
    # a step that adds an eighth of the noise the accountant was told of is caught
    config = load_config(["task=digits", "privacy.epsilon=1"])
    setting, planted = S.RoundSetting.of(config), np.random.default_rng(0).random(1000) < 0.5
    weak = setting.noise_multiplier / 8
    scores = S.likelihood_ratio(S.step_coordinates(setting, config, planted, weak),
                                setting.sample_rate, weak)
    assert A.epsilon_lower_bound(scores[planted], scores[~planted], delta=setting.delta) > setting.accountant_epsilon()


def test_a_code_model_trained_without_dp_finds_its_planted_lines_likelier_than_the_held_back_ones(lm_overrides):
    """The canary design carries a membership signal: lines of random characters did not (a student
    learns that random characters follow, planted or not)."""
    import copy

    from client.dp_train import distill_locally
    from common.step_plan import plan_round
    from fedistill.inprocess import sites_of, start_of, task_of

    config = load_config([*lm_overrides, "privacy=none", "distill.alpha=0", "distill.lr=0.5", "distill.local_epochs=5",
                          "task.corpus.max_length=64"])
    canaries = A.Canaries.draw(task_of(config), 100, seed=0, kind="unique-lines")
    site = A.planted_site(sites_of(config)[0], canaries)
    reference = start_of(config)[0]
    student = copy.deepcopy(reference)
    distill_locally(student, site.data, objective=site.objective, distill=config.distill, privacy=config.privacy,
                    noise_multiplier=None, plan=plan_round(config.distill, config.privacy, site.plan_size), seed=0)
    scores = canaries.scores(student, reference)
    assert A.auc(scores[canaries.planted], scores[~canaries.planted]) > 0.6
