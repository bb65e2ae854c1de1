"""Two sites whose records differ in one record answer every request alike before their DP release.

A thousand requests, generated: the coordinator's honest request changed in every way a curious
coordinator might (values out of range or of the wrong type, strings that interpolate or name
paths, keys the schema does not hold, no JSON at all), with round numbers, assets and global
weights that are right or wrong. Each goes to both sites through the ClientApp's `answer`; what
the coordinator sees of the two replies, refusals included, must be the same byte for byte (the
trained weights aside: those are the DP release), held to the same bound, and free of anything
from the sites' environment or files.
"""

from __future__ import annotations

import copy
import os
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

import client.app as client_app
from client.site import clear_sites
from common import payload as P
from common.config import load_config
from common.policy import POLICY_NODE_KEY
from common.request import encode, request_of, schema_keys
from common.tasks import build_task

SECRET = "s3cr3t-from-the-sites-environment"
MARKER = "site-private-folder"  # in every path of the sites' files
EXAMPLES = int(os.environ.get("FEDISTILL_DIFFERENTIAL_EXAMPLES", 1000))  # 1,000 in CI
BASE = ["task=digits", "rounds=3", "distill.local_epochs=1", "distill.sample_rate=0.25"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache_dir):
    """The two sites' files, the honest request and what the server announces."""
    root = tmp_path_factory.mktemp(MARKER)
    digits = load_digits()
    images, labels = (digits.images[:121] / 16).astype(np.float32), digits.target[:121]
    for name, count in (("with", 121), ("without", 120)):  # the same records, but for one
        np.savez(root / f"{name}.npz", images=images[:count], labels=labels[:count])

    def site_file(name: str, ledger: int) -> str:
        """Site `name`'s file, keeping its ledger in folder number `ledger` (a new one: a fresh budget)."""
        path = root / name / f"site-{ledger}.yaml"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_text(f"name: site\nledger_dir: {root / name / f'ledgers-{ledger}'}\ncache_dir: {cache_dir}\n"
                            f"data_path: {root / name}.npz\ntask_sources: [digits]\nmax_rounds: 5\nreply_after_s: 30\n")
        return str(path)

    config = load_config([*BASE, f"cache_dir={cache_dir}"])
    task = build_task(config)
    return {"site_file": site_file, "root": root, "request": json.loads(encode(request_of(config))),
            "assets": P.asset_manifest(task), "student": P.model_to_record(task.student(config.student))}


LEAVES = sorted(schema_keys())
PATHS = ["/etc/passwd", "../../..", "x/../../outside/y", "~/.ssh/id_rsa", "stdlib:os", "/tmp/*", "file:///root"]
INTERPOLATIONS = ["${oc.env:SITE_SECRET}", "$\\{oc.env:SITE_SECRET}", "${oc.env:HOME}", "${hydra:runtime.cwd}",
                  "${oc.decode:'1'}", "${now:%H}"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**9), st.floats(allow_nan=False),
                    st.sampled_from(PATHS + INTERPOLATIONS), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def _set(document: dict, key: str, value) -> None:
    *path, last = key.split(".")
    node = document
    for part in path:
        if not isinstance(node.get(part), dict):
            return
        node = node[part]
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value


_DELETE = object()

def often(value, *others):
    """`value` about two times in three, else one of `others`."""
    return st.one_of(st.just(value), st.just(value), *others)


honest_changes = st.fixed_dictionaries({}, optional={
    "privacy.epsilon": st.sampled_from([0.5, 1.0, 2.0, 3.0, 8.0]),
    "privacy.delta": st.sampled_from([1e-6, 1e-5, 1e-4]),
    "privacy.enabled": often(True, st.just(False)),
    "rounds": st.integers(1, 6),
    "seed": st.integers(0, 3),
    "student.hidden": st.sampled_from([[16], [8, 8], []]),
    "exchange.mode": st.sampled_from(["weights", "logits"]),
    "task": often("digits", st.sampled_from(["mnist", "text", "lm", "nosuchtask"])),
    "source": often("digits", st.sampled_from(["mnist", "pkg.module:factory"])),
})
hostile_changes = often([], st.lists(st.tuples(st.one_of(st.sampled_from(LEAVES), st.sampled_from(
    ["data_path", "hydra", "task_data", "corpus", "version", "privacy.ledger_dir", "student.path"])),
    st.one_of(values, st.just(_DELETE))), min_size=1, max_size=3))


@st.composite
def requests(draw, world):
    """A round's config record, its global weights ("right", "none", "nan", "shape"), the run id and
    the sites' ledger folder. Half are honest requests that mostly train (often on fresh ledgers),
    or meet the site's budget, policy or replay check; the other half are changed in every way at
    once, on the ledgers every such request shares."""
    document = copy.deepcopy(world["request"])
    for key, value in draw(honest_changes).items():
        _set(document, key, value)
    keys = {**world["assets"], P.SERVER_ROUND: draw(st.integers(1, 3)), P.REQUEST: json.dumps(document)}
    run = draw(st.integers(1, 40))
    if draw(st.booleans()):
        return keys, "right", run, draw(st.integers(1, 10**6))
    for key, value in draw(hostile_changes):
        _set(document, key, value)
    text = draw(often(json.dumps(document), st.text(max_size=40), st.sampled_from(INTERPOLATIONS),
                      st.integers(-10**12, 10**12), st.none()))
    keys.pop(P.REQUEST)
    if text is not None:
        keys[P.REQUEST] = text
    keys[P.SERVER_ROUND] = draw(often(1, st.integers(0, 7), st.booleans(), st.floats(0, 3),
                                      st.sampled_from(INTERPOLATIONS)))
    if draw(st.booleans()):
        keys[P.ROUNDS_LEFT] = draw(st.one_of(st.integers(-1, 7), st.text(max_size=3)))
    wrong = draw(often(None, st.sampled_from([P.TEACHER_SHA256, P.PUBLIC_SHA256, P.PUBLIC_COUNT])))
    if wrong is not None:
        keys[wrong] = draw(st.one_of(st.sampled_from(["0" * 64, SECRET]), st.integers(0, 10**6)))
    return keys, draw(often("right", st.sampled_from(["none", "nan", "shape"]))), run, 0


def _arrays(world, kind: str) -> ArrayRecord | None:
    if kind == "none":
        return None
    arrays = {k: v.numpy().copy() for k, v in world["student"].items()}
    first = sorted(arrays)[0]
    if kind == "nan":
        arrays[first].flat[0] = np.nan
    if kind == "shape":
        arrays[first] = np.zeros((2, 2), np.float32)
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _seen(reply: RecordDict) -> dict:
    """What the coordinator sees of a reply, its DP release as array names, shapes and types only."""
    return {"config": {n: dict(r) for n, r in reply.config_records.items()},
            "metrics": {n: dict(r) for n, r in reply.metric_records.items()},
            "arrays": {n: {k: (tuple(v.shape), v.dtype) for k, v in r.items()} for n, r in reply.array_records.items()}}


@pytest.fixture(scope="module")
def held(world):
    """Every call of the reply's hold, recorded instead of slept: (the site file, its bound)."""
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SITE_SECRET", SECRET)
        patch.setattr(client_app, "hold_reply", lambda policy, started, name: calls.append(
            (policy.pads_replies, policy.reply_after_s)))
        clear_sites()
        yield calls
        clear_sites()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_sites_differing_in_one_record_answer_every_request_alike(world, held, data):
    keys, arrays, run, ledger = data.draw(requests(world))
    seen = []
    for name in ("with", "without"):
        content = RecordDict({P.CONFIG: ConfigRecord(keys)})
        global_student = _arrays(world, arrays)
        if global_student is not None:
            content[P.ARRAYS] = global_student
        context = Context(run_id=run, node_id=1, node_config={POLICY_NODE_KEY: world["site_file"](name, ledger)},
                          state=RecordDict(), run_config={})
        reply = client_app.answer(content, context)
        text = str(_seen(reply))
        assert SECRET not in text and MARKER not in text and str(world["root"]) not in text, text
        seen.append(_seen(reply))
    assert seen[0] == seen[1]
    status = seen[0]["config"][P.CONFIG]
    event(f"{status[P.STATUS]} {status.get(P.CODE, '')}")  # --hypothesis-show-statistics tallies the outcomes
    assert held[-2:] == [(True, 30.0), (True, 30.0)]  # both held to the same bound
