"""The run request: typed, bounded data; anything outside its schema is refused without repeating it."""

import json
import math
import typing

import pytest

from common.config import load_config
from common.request import BOUNDS, MAX_BYTES, RequestError, decode, encode, request_of, schema_keys


def _document(*overrides: str) -> dict:
    return json.loads(encode(request_of(load_config(["task=digits", *overrides]))))


@pytest.mark.parametrize("overrides", [
    [], ["privacy=none"], ["exchange=logits", "exchange.broadcast=logits", "exchange.site_students=[{hidden:[8]},{}]"],
    ["task=text", "task.data.path=/x.csv", "distill.attention_layers=[[0,-1],[1,2]]", "student=transformer"],
    ["task=lm"], ["task.source=partner.tasks:build"],
])
def test_a_request_reads_back_as_the_coordinators_values(overrides):
    request = request_of(load_config(overrides))
    assert decode(encode(request)) == request


def _leaf(kind):
    return typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind


def test_every_number_of_the_schema_is_bounded():
    for key, kind in schema_keys().items():
        if _leaf(kind) in (int, float):
            assert key in BOUNDS, key
        else:
            assert _leaf(kind) in (bool, str) or key in ("distill.attention_layers", "exchange.site_students"), key


@pytest.mark.parametrize("key", [k for k, kind in schema_keys().items() if kind is str])
def test_every_string_of_the_schema_is_one_of_its_names(key):
    with pytest.raises(RequestError):
        decode(json.dumps(_set(_document(), key, "${oc.env:SITE_SECRET}")))


def test_infinity_is_the_only_non_finite_number_and_only_where_the_bounds_allow_it():
    assert math.isinf(decode(encode(request_of(load_config(["privacy=none"])))).privacy.epsilon)
    for bad in ('"max_grad_norm":NaN', '"max_grad_norm":-Infinity', '"max_grad_norm":Infinity'):
        text = encode(request_of(load_config([])))
        assert '"max_grad_norm":1.0' in text
        text = text.replace('"max_grad_norm":1.0', bad, 1)
        with pytest.raises(RequestError):
            decode(text)


def _set(document: dict, key: str, value) -> dict:
    *path, last = key.split(".")
    node = document
    for part in path:
        node = node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return document


@pytest.mark.parametrize("key, value", [
    ("task", "${oc.env:SITE_SECRET}"), ("task", "../../outside/y"), ("task", "x/../../y"), ("task", ""),
    ("source", "${oc.env:SITE_SECRET}"), ("source", "os:system"[:-1] + " "), ("source", "a:b:c"),
    ("privacy.ledger_dir", "/tmp/elsewhere"), ("task_data_path", "/etc/passwd"), ("hydra", {"searchpath": ["/"]}),
    ("rounds", True), ("rounds", 2.0), ("rounds", "2"), ("rounds", 0), ("rounds", 10**9), ("seed", -1),
    ("privacy.enabled", 1), ("privacy.epsilon", "3"), ("privacy.delta", 1.5), ("privacy.accountant", "prv"),
    ("student.arch", "${oc.env:HOME}"), ("student.hidden", [64] * 65), ("student.hidden", [0]),
    ("distill.sample_rate", 0), ("distill.lr", -1), ("exchange.mode", "both"),
    ("exchange.site_students", [{"arch": "mlp"}]), ("exchange.site_students", [{"hidden": "64"}]),
    ("exchange.server.warm_start", "yes"), ("exchange.server", None), ("student", KeyError), ("privacy.delta", KeyError),
    ("version", 3), ("version", 5), ("version", True),
])
def test_a_request_outside_the_schema_is_refused(key, value):
    document = _set(_document(), key, value)
    with pytest.raises(RequestError) as refused:
        decode(json.dumps(document))
    assert refused.value.detail  # the site's log says what; the reason that leaves is one fixed text


@pytest.mark.parametrize("text", [None, 7, b"{}", "", "not json", "[]", "{" * 100_000, " " * (MAX_BYTES + 1)])
def test_anything_that_is_not_a_request_document_is_refused(text):
    with pytest.raises(RequestError):
        decode(text)


def test_the_request_holds_no_path_and_nothing_the_site_reads_its_records_with():
    keys = set(schema_keys())
    assert not {k for k in keys if k.startswith(("task.", "run_dir", "cache_dir", "federation", "sites"))}
    assert {"task", "source", "rounds", "seed"} <= keys
