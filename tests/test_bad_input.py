"""Bad input, generated: ledger files, site files and reply payloads thrown at their readers.

Each reader either accepts a value it can vouch for or refuses it with its own error, which
names the file or the problem: never another exception (a traceback), and never a silent
reading that weakens privacy (a corrupt ledger read as spending less, a reply aggregated
though malformed). Generated cases per reader: `FEDISTILL_BAD_INPUT_EXAMPLES` (150 by default,
1,350 in all over the nine readers).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import payload as P
from common.config import ConfigError, load_config
from common.policy import load_policy
from common.privacy import LEDGER_FILE, Budget, DataFingerprint, LedgerError, PrivacyLedger
from server.rounds import INVALID, REFUSED, TRAINED, read_content

EXAMPLES = int(os.environ.get("FEDISTILL_BAD_INPUT_EXAMPLES", 150))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

BUDGET = Budget(epsilon=3.0, delta=1e-5)
DATA = DataFingerprint(dataset="digits", partition="seed 0, 3 sites", records="ab" * 32)

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                      st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def good_entry(**changes) -> dict:
    return {"noise_multiplier": 1.2, "sample_rate": 0.05, "steps": 40, "run": "run-1", "round": 1,
            "time": 1.7e9, "dp": True, "released": None, **changes}


def ledger_doc(entries: list) -> dict:
    return {"format": "fedistill-privacy-ledger", "version": 2, "accountant": "rdp", "delta": BUDGET.delta,
            "budget": BUDGET.epsilon, "data": {"dataset": DATA.dataset, "partition": DATA.partition,
                                                 "records": DATA.records}, "entries": entries}


ENTRY_KEYS = list(good_entry())
corrupt_entry = st.one_of(
    st.builds(lambda key, value: good_entry(**{key: value}), st.sampled_from(ENTRY_KEYS), json_value),
    st.builds(lambda key: {k: v for k, v in good_entry().items() if k != key}, st.sampled_from(ENTRY_KEYS)),
    st.builds(lambda extra: good_entry(**{"extra": extra}), json_value),
    json_value,
)
ledger_text = st.one_of(
    st.builds(lambda entries: json.dumps(ledger_doc(entries)), st.lists(corrupt_entry, min_size=1, max_size=3)),
    st.builds(lambda doc: json.dumps(doc), json_value),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.builds(lambda cut: json.dumps(ledger_doc([good_entry()]))[:cut], st.integers(0, 300)),
)


@FUZZ
@given(text=ledger_text)
def test_a_corrupt_ledger_is_refused_or_read_as_exactly_what_it_holds(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("ledger") / "site-0"
    folder.mkdir(mode=0o700)
    (folder / LEDGER_FILE).write_text(text)
    try:
        ledger = PrivacyLedger(folder, budget=BUDGET, data=DATA)
    except LedgerError as err:
        assert LEDGER_FILE in str(err)
        return
    for entry in ledger.entries:  # what was accepted is well typed and possible, so it counts in full
        assert type(entry.steps) is int and entry.steps >= (1 if entry.dp else 0)
        assert type(entry.round) is int and isinstance(entry.run, str) and type(entry.dp) is bool
        if entry.dp:
            assert math.isfinite(entry.noise_multiplier) and entry.noise_multiplier > 0 and 0 < entry.sample_rate <= 1
    spent = ledger.epsilon_spent()
    assert spent >= 0 and (spent > 0 or not ledger.entries)


site_value = st.one_of(json_value, st.sampled_from(["~", "/etc/passwd", "${oc.env:HOME}", "-1", "inf", "nan", ""]))
site_file = st.one_of(
    st.dictionaries(st.sampled_from(["epsilon", "delta", "require_dp", "max_rounds", "ledger_dir", "cache_dir",
                                     "data_path", "task", "task_sources", "name", "teacher_path", "app_sha256",
                                     "allow_unpinned_apps", "reply_after_s", "metrics_port", "metrics_host",
                                     "supernode", "size_class", "unknown_key"]), site_value, max_size=4),
    json_value,
    st.text(max_size=40),
)


@FUZZ
@given(values=site_file)
def test_a_bad_site_file_is_refused_by_name(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("site") / "site.yaml"
    path.write_text(values if isinstance(values, str) else json.dumps(values))  # JSON is YAML
    try:
        policy = load_policy(path)
    except ConfigError as err:
        assert str(path) in str(err)
        return
    assert 0 < policy.epsilon and 0 < policy.delta < 1 and policy.max_rounds >= 1


SPEC_NAMES = ["net.1.weight", "net.1.bias"]
array_value = st.one_of(
    st.builds(lambda shape, fill: np.full(shape, fill, dtype=np.float32),
              st.sampled_from([(4, 3), (3,), (4,), (0,), (2, 2, 2)]), st.floats(width=32, allow_nan=True)),
    st.builds(lambda shape: np.zeros(shape, dtype=np.int64), st.sampled_from([(4, 3), (3,)])),
)
metric_value = st.one_of(st.integers(-10**9, 10**9), st.floats(allow_nan=True))
config_value = st.one_of(st.text(max_size=12), st.integers(-5, 5), st.booleans(), st.floats(allow_nan=True))
reply = st.builds(
    lambda arrays, metrics, config: RecordDict({
        **({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()})} if arrays is not None else {}),
        P.METRICS: MetricRecord(metrics), P.CONFIG: ConfigRecord(config)}),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(SPEC_NAMES + ["other"]), array_value, max_size=3)),
    st.dictionaries(st.sampled_from([P.EPSILON_SPENT, P.EPSILON_BUDGET, P.NOISE_MULTIPLIER, P.SAMPLE_RATE,
                                     P.DP_STEPS, P.TRAIN_LOSS, "num-examples"]), metric_value, max_size=4),
    st.dictionaries(st.sampled_from([P.STATUS, P.SITE, P.REASON, P.CODE, "extra"]), config_value, max_size=4),
)


class FixedShapeExchange:
    """The weights exchange's check, reduced to a fixed spec: two arrays, finite, bounded."""

    expected = {"net.1.weight": ((4, 3), "float32"), "net.1.bias": ((3,), "float32")}

    def check(self, content: RecordDict) -> str:
        if P.ARRAYS not in content.array_records:
            return "no arrays"
        return P.check_arrays(content[P.ARRAYS], self.expected, max_abs=1000.0, max_bytes=10_000)


@FUZZ
@given(content=reply)
def test_a_malformed_reply_is_never_accepted(content):
    allowed = set(P.released_items(mode="weights", weighting="uniform", dp=True))
    outcome = read_content(content, 7, FixedShapeExchange(), allowed)
    assert outcome.status in (TRAINED, REFUSED, INVALID)
    if outcome.status == TRAINED:  # only what the exchange vouches for, holding nothing else
        arrays = content[P.ARRAYS]
        assert sorted(arrays) == sorted(FixedShapeExchange.expected)
        for name, (shape, dtype) in FixedShapeExchange.expected.items():
            value = arrays[name].numpy()
            assert value.shape == shape and str(value.dtype) == dtype and np.isfinite(value).all()
        assert P.reply_items(content) <= allowed


override_key = st.sampled_from(["sites", "rounds", "seed", "privacy.epsilon", "privacy.delta", "privacy.max_grad_norm",
                                "distill.sample_rate", "distill.lr", "distill.batch_size", "exchange.topk",
                                "exchange.teacher_weight", "exchange.aggregation", "federation.min_replies",
                                "federation.fraction_train", "task.split.public", "task.dirichlet_alpha", "task",
                                "student", "privacy", "exchange", "no.such.key", "+hydra.run.dir"])
override_value = st.one_of(st.integers(-3, 10**6).map(str), st.floats(allow_nan=True).map(str),
                           st.sampled_from(["", "null", "true", "[1,2]", "{a: 1}", "${oc.env:HOME}", "'quoted",
                                            "digits", "mlp", "dp", "logits", "median"]),
                           st.text(alphabet=st.characters(codec="ascii"), max_size=10))


@FUZZ
@given(overrides=st.lists(st.tuples(override_key, override_value).map("=".join), min_size=1, max_size=3))
def test_a_bad_command_line_is_refused_with_a_config_error(overrides):
    try:
        config = load_config(overrides)
    except ConfigError as err:
        assert str(err)
        return
    assert config.sites >= 1 and config.rounds >= 1 and 0 < config.privacy.delta < 1
