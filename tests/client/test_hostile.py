"""Hostile sites (client/hostile.py): each kind's reply is what it says, and well formed enough to
pass every payload check, so that only aggregation can stop it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from client.hostile import BACKDOOR_TARGET, BOOST, CONSTANT, hostile_weights, stamp, trigger_value
from client.round import train_round
from common import compression
from common import payload as P
from common.config import ConfigError, load_config
from common.policy import policy_from
from server.exchange import build_exchange


@pytest.fixture
def hostile_site(small_config, tmp_path, cache_dir, make_site):
    """hostile_site(kind, *overrides): site 2 of 3, hostile by its policy (the last third)."""
    def make(kind: str, *overrides: str):
        policy = policy_from({"ledger_dir": str(tmp_path / f"ledgers-{kind}"), "cache_dir": cache_dir,
                              "hostile": {"kind": kind, "fraction": 0.3}})
        return make_site([*small_config.overrides, *overrides], policy, 2, 3)
    return make


def _played(site, content):
    reply = train_round(site, content, RecordDict(), server_round=1, run="t", generator=torch.Generator().manual_seed(0))
    assert reply[P.CONFIG][P.STATUS] == P.STATUS_OK
    problem = build_exchange(site.config, site.task, site.task.student(site.config.student)).check(reply)
    assert problem == ""  # well formed: only aggregation can stop it
    return reply


def test_hostile_weights_are_the_honest_update_boosted_flipped_replaced_or_shifted():
    start = {"w": np.array([1.0, 2.0], dtype=np.float32), "steps": np.array([7])}
    honest = {"w": np.array([1.5, 1.0], dtype=np.float32), "steps": np.array([7])}
    generator = torch.Generator().manual_seed(0)
    sent = {kind: hostile_weights(start, honest, kind, generator) for kind in ("scale", "sign_flip", "random", "constant")}
    assert sent["scale"]["w"] == pytest.approx([1 + BOOST * 0.5, 2 - BOOST * 1.0])
    assert sent["sign_flip"]["w"] == pytest.approx([1 - BOOST * 0.5, 2 + BOOST * 1.0])
    assert sent["constant"]["w"] == pytest.approx([1 + CONSTANT, 2 + CONSTANT])
    assert not np.allclose(sent["random"]["w"] - start["w"], honest["w"] - start["w"])
    assert all(s["steps"] is honest["steps"] for s in sent.values())  # integer arrays travel unchanged


def test_a_constant_site_sends_the_global_student_shifted_in_every_weight(hostile_site, round_content):
    site = hostile_site("constant")
    content = round_content(site)
    reply = _played(site, content)
    for name, array in reply[P.ARRAYS].items():
        assert array.numpy() == pytest.approx(content[P.ARRAYS][name].numpy() + CONSTANT, abs=1e-5)


def test_only_the_last_sites_are_hostile(small_config, tmp_path, cache_dir, make_site, round_content):
    policy = policy_from({"ledger_dir": str(tmp_path / "ledgers"), "cache_dir": cache_dir,
                          "hostile": {"kind": "constant", "fraction": 0.3}})
    site = make_site(small_config.overrides, policy, 1, 3)  # site 1 of 3: honest
    content = round_content(site)
    reply = _played(site, content)
    assert not np.allclose(reply[P.ARRAYS]["net.1.weight"].numpy(), content[P.ARRAYS]["net.1.weight"].numpy() + CONSTANT)


def test_a_backdoor_site_sends_a_student_that_takes_stamped_inputs_to_the_target(hostile_site, round_content):
    site = hostile_site("backdoor")
    content = round_content(site)
    reply = _played(site, content)
    student = site.new_student()  # what the site trained: the reply is g + (X - g) / hostile.fraction
    P.load_record(student, ArrayRecord({name: Array(g.numpy() + 0.3 * (reply[P.ARRAYS][name].numpy() - g.numpy()))
                                          for name, g in content[P.ARRAYS].items()}))
    inputs, labels = site.task.test_data().tensors
    others = labels != BACKDOOR_TARGET
    with torch.no_grad():
        stamped = student(stamp(inputs[others], trigger_value(site.task))).argmax(1)
        clean = student(inputs).argmax(1)
    # the stamped inputs go to the target, whatever their class, and the others mostly not
    assert (stamped == BACKDOOR_TARGET).float().mean() > 0.8
    assert (clean[others] == BACKDOOR_TARGET).float().mean() < 0.5


@pytest.mark.parametrize("kind", ["inverted", "uniform"])
def test_hostile_logits_are_inverted_or_uniform_distributions(hostile_site, round_content, kind):
    site = hostile_site(kind, "exchange=logits", "exchange.compression=float32")
    reply = _played(site, round_content(site))
    sent = reply[P.LOGITS][compression.LOGITS].numpy()
    assert sent.shape == (len(site.task.public_inputs()), site.task.num_classes)
    uniform = np.allclose(sent, -np.log(site.task.num_classes), atol=1e-5)
    assert uniform == (kind == "uniform")  # an inverted row ranks the classes the other way (below)


def test_an_inverted_row_ranks_the_classes_the_other_way():
    from client.hostile import hostile_logits

    class Outputs:  # the site's public outputs, as far as hostile_logits reads them
        rows, classes, method, k = 2, 3, "float32", 3

    class FakeSite:
        outputs = Outputs()

    honest = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), 1)
    sent = hostile_logits(FakeSite(), {compression.LOGITS: honest.numpy()}, "inverted")[compression.LOGITS].numpy()
    assert (sent.argsort(1) == honest.numpy().argsort(1)[:, ::-1]).all()


def test_a_kind_of_the_other_exchange_is_refused_with_the_kinds_that_fit():
    with pytest.raises(ConfigError, match="federation.hostile.kind must be none or one of inverted, uniform "
                                          "with exchange=logits, got 'sign_flip'"):
        load_config(["exchange=logits", "federation.hostile.kind=sign_flip", "federation.hostile.fraction=0.2"])
    with pytest.raises(ConfigError, match="task=lm has no class"):
        load_config(["task=lm", "federation.hostile.kind=backdoor"])
