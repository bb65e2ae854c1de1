import math
import shlex

import pytest

from common.config import ConfigError, load_config


def test_default_config_composes_and_validates():
    config = load_config([])
    assert config.task.name == "mnist"
    assert config.privacy.enabled and 0 < config.privacy.epsilon < math.inf
    assert config.exchange.mode == "weights"


def test_overrides_travel_as_one_string():
    overrides = ["task=digits", "sites=8", "privacy.epsilon=1", "run_dir=/tmp/a b"]
    config = load_config(shlex.join(overrides))
    assert (config.task.name, config.sites, config.privacy.epsilon, config.run_dir) == ("digits", 8, 1.0, "/tmp/a b")


@pytest.mark.parametrize(
    "override, message",
    [
        ("privacy.delta=2", r"privacy.delta must be in \(0, 1\), got 2.0"),
        ("sites=0", "sites must be >= 1, got 0"),
        ("privacy.epsilon=-1", "privacy.epsilon must be a finite number > 0"),
        ("task.split.teacher=0.7", "must leave at least 0.1"),
        ("distill.alpha=1.5", r"distill.alpha must be in \[0, 1\], got 1.5"),
        ("privacy.accountant=prv", "privacy.accountant must be 'rdp'"),
        ("federation.min_sites=9", r"federation.min_sites \(9\) must be <= sites \(5\)"),
        ("federation.min_replies=0", "federation.min_replies must be >= 1, got 0"),
        ("federation.min_replies=6", r"federation.min_replies \(6\) must be <= the 5 sites sampled each round"),
        ("federation.max_failed_rounds=-1", r"federation.max_failed_rounds must be >= 0 \(0: never stop\)"),
        ("sites=many", "sites"),
        ("privacy.noise=3", "privacy.noise"),
        ("task=imagenet", "imagenet"),
        ("privacy.max_noise_multiplier=inf", "privacy.max_noise_multiplier must be in"),
        ("exchange.count_noise=inf", "exchange.count_noise must be in"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([override])


def test_an_unknown_key_lists_the_keys_of_the_group_the_overrides_chose():
    with pytest.raises(ConfigError, match="student.heads is not a config key; the keys of student are: arch, dim, ff"):
        load_config(["task=text", "student.heads=2"])  # task=text picks the bag student, which has no heads


def test_no_dp_must_be_asked_for_explicitly():
    config = load_config(["privacy=none"])
    assert not config.privacy.enabled
    with pytest.raises(ConfigError, match="privacy=none"):
        load_config(["privacy.epsilon=inf"])


def test_a_pairing_file_sets_what_a_task_needs_with_one_student_and_overrides_still_win():
    assert load_config(["task=lm"]).exchange.server.lr == 0.003  # task=lm's own, for its from-scratch student
    pruned = load_config(["task=lm", "student=pruned"])
    assert (pruned.exchange.server.lr, pruned.exchange.server.epochs) == (0.001, 10)  # conf/pairing/lm_pruned.yaml
    assert load_config(["task=lm", "student=pruned", "exchange.server.lr=0.0002"]).exchange.server.lr == 0.0002
    with pytest.raises(ConfigError, match="task=mnist trains mlp students"):
        load_config(["student=pruned"])  # no pairing file for mnist: composed, then refused by the task
