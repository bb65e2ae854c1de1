"""The site policy: read on the site's side, and a request outside it is named."""

import pytest

from common.config import ConfigError, load_config
from common.policy import POLICY_ENV, POLICY_NODE_KEY, load_policy, policy_from, site_policy


@pytest.fixture
def policy():
    return policy_from({"epsilon": 3.0, "delta": 1e-5, "max_rounds": 10, "task_sources": ["digits"]})


def test_a_request_inside_the_policy_has_no_violations(policy):
    assert policy.violations(load_config(["task=digits", "rounds=10", "privacy.epsilon=2", "privacy.delta=1e-6"])) == []


@pytest.mark.parametrize(
    "override, named",
    [
        ("privacy=none", "site.require_dp"),
        ("privacy.epsilon=8", "privacy.epsilon=8 exceeds the site's budget 3"),
        ("privacy.delta=1e-4", "privacy.delta=0.0001 exceeds the site's delta 1e-05"),
        ("rounds=11", "rounds=11 exceeds the site's limit of 10"),
        ("task=mnist", "task.source='mnist' is not one of the site's task sources (site.task_sources)"),
    ],
)
def test_each_request_outside_the_policy_is_named(policy, override, named):
    request = load_config(["task=digits", "rounds=2", override])
    [problem] = policy.violations(request)
    assert named in problem


def test_a_site_that_allows_training_without_dp_accepts_privacy_none():
    allowing = policy_from({"require_dp": False, "task_sources": ["digits"]})
    assert allowing.violations(load_config(["task=digits", "privacy=none"])) == []


def test_a_policy_file_sets_some_keys_and_keeps_the_defaults_of_the_rest(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("epsilon: 1.5\nledger_dir: /var/lib/ledgers\n")
    loaded = load_policy(path)
    assert (loaded.epsilon, loaded.ledger_dir, loaded.require_dp) == (1.5, "/var/lib/ledgers", True)
    assert str(loaded.ledger_root) == "/var/lib/ledgers"


@pytest.mark.parametrize(
    "text, message",
    [
        ("epsilon: 0\n", "site.epsilon must be a finite number > 0"),
        ("epsilon: .inf\n", "site.epsilon must be a finite number > 0"),
        ("delta: 2\n", r"site.delta must be in \(0, 1\)"),
        ("noise: 3\n", "the keys of a site policy are"),
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
