"""The site policy: read on the site's side, and a request outside it is named."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from common.policy import POLICY_ENV, POLICY_NODE_KEY, load_policy, policy_from, site_policy
from common.request import request_of

ROOT = Path(__file__).resolve().parents[2]


def _request(*overrides):
    return request_of(load_config(list(overrides)))


@pytest.fixture
def policy():
    return policy_from({"epsilon": 3.0, "delta": 1e-5, "max_rounds": 10, "task_sources": ["digits"]})


def test_a_request_inside_the_policy_has_no_violations(policy):
    assert policy.violations(_request("task=digits", "rounds=10", "privacy.epsilon=2", "privacy.delta=1e-6")) == []


@pytest.mark.parametrize(
    "override, named",
    [
        ("privacy=none", "privacy.enabled is false: the site's policy requires DP (site.require_dp)"),
        ("privacy.epsilon=8", "privacy.epsilon exceeds the site's budget 3 (site.epsilon)"),
        ("privacy.delta=1e-4", "privacy.delta exceeds the site's delta 1e-05 (site.delta)"),
        ("rounds=11", "rounds exceeds the site's limit of 10 per run (site.max_rounds)"),
        ("task=mnist", "task.source is not one of the site's task sources (site.task_sources)"),
    ],
)
def test_each_request_outside_the_policy_is_named_without_repeating_its_value(policy, override, named):
    [problem] = policy.violations(_request("task=digits", "rounds=2", override))
    assert problem == named


def test_a_site_that_allows_training_without_dp_accepts_privacy_none():
    allowing = policy_from({"require_dp": False, "task_sources": ["digits"]})
    assert allowing.violations(_request("task=digits", "privacy=none")) == []


@pytest.mark.parametrize("records, ok", [(99_999, True), (100_000, False), (1_000_000, False)])
def test_the_sites_delta_must_be_below_one_over_its_record_count(records, ok):
    policy = policy_from({"delta": 1e-5})
    if ok:
        policy.check_delta(records)
    else:
        with pytest.raises(ConfigError, match=f"not below 1/N for the site's {records} records"):
            policy.check_delta(records)


@pytest.mark.parametrize("name", ["site.a", "../up", "a/b", "", "x" * 65])
def test_a_site_name_is_letters_digits_underscores_and_dashes(name):
    with pytest.raises(ConfigError, match="site.name must be"):
        policy_from({"name": name})


@pytest.mark.parametrize("task, message", [({"name": "x"}, "not task.name, task.source or task.kind"),
                                           ({"kind": "os"}, "not task.name, task.source or task.kind"),
                                           ({"data": {"colour": 1}}, "'data.colour' is not a task setting"),
                                           ({"teacher": {"top_k": 4, "channels": [8]}}, "fits no task of this app")])
def test_a_site_files_task_settings_are_task_keys_other_than_name_source_and_kind(task, message):
    with pytest.raises(ConfigError, match=message):
        policy_from({"task": task})


def test_a_policy_file_sets_some_keys_and_keeps_the_defaults_of_the_rest(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("epsilon: 1.5\nledger_dir: /var/lib/ledgers\n")
    loaded = load_policy(path)
    assert (loaded.epsilon, loaded.ledger_dir, loaded.require_dp) == (1.5, "/var/lib/ledgers", True)
    assert str(loaded.ledger_root) == "/var/lib/ledgers"


def test_a_policy_file_changed_at_once_is_read_anew_and_a_loaded_policy_is_the_callers_own(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("epsilon: 1.5\n")
    first = load_policy(path)
    path.write_text("epsilon: 2.5\n")  # same size, likely the same timestamp: the content decides
    assert load_policy(path).epsilon == 2.5
    path.write_text("epsilon: 1.5\n")
    first.epsilon = 9.0
    assert load_policy(path).epsilon == 1.5
    path.write_text("epsilon: 0\n")
    with pytest.raises(ConfigError, match="site.epsilon"):
        load_policy(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("epsilon: 0\n", "site.epsilon must be a finite number > 0"),
        ("epsilon: .inf\n", "site.epsilon must be a finite number > 0"),
        ("delta: 2\n", r"site.delta must be in \(0, 1\)"),
        ("noise: 3\n", "the keys of a site policy are"),
        ("reply_after_s: -1\n", r"site.reply_after_s must be in \[0, 86400\]"),
        ("- a list\n", "must be a YAML mapping"),
    ],
)
def test_a_bad_policy_file_is_refused_with_its_path_and_the_key(tmp_path, text, message):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_policy(path)


def test_a_missing_policy_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_policy(tmp_path / "nope.yaml")


def test_the_node_config_wins_over_the_environment_which_wins_over_the_defaults(tmp_path, monkeypatch):
    node_file, env_file = tmp_path / "node.yaml", tmp_path / "env.yaml"
    node_file.write_text("epsilon: 1.0\n")
    env_file.write_text("epsilon: 2.0\n")
    monkeypatch.delenv(POLICY_ENV, raising=False)
    assert site_policy({}).epsilon == policy_from().epsilon == 3.0
    monkeypatch.setenv(POLICY_ENV, str(env_file))
    assert site_policy({"partition-id": 0}).epsilon == 2.0
    assert site_policy({POLICY_NODE_KEY: str(node_file)}).epsilon == 1.0


def test_the_default_ledger_lives_on_the_site_outside_any_run(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert policy_from().ledger_root == tmp_path / "fedistill" / "ledgers"


def test_validating_an_image_sites_task_settings_imports_no_language_model_stack():
    """Every ClientApp message validates the site's policy: its task block must not cost the
    import of transformers (seconds per message) where the kind that fits needs none."""
    check = ("import sys; from common.policy import policy_from; "
             "policy_from({'task_sources': ['digits'], 'task': {'dirichlet_alpha': 2.0, 'teacher': {'epochs': 3}}}); "
             "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            check=True)
    assert result.stdout.split() == ["False"]


def test_task_settings_that_fit_no_kind_name_each_kind_tried():
    with pytest.raises(ConfigError, match=r"site.task fits no task of this app \(image: key .*; lm: .*; tabular: .*; text: "):
        policy_from({"task": {"no_such_setting": 1}})
