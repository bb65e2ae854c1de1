"""Bad input, generated: a site's data files of every task (CSV, TSV and JSON lines of texts,
tables, source files of a code corpus, `.npz` images) and its certificates and key.

Each reader either returns records it can vouch for (labels among the task's, finite values,
token ids in the vocabulary) or refuses the file with its own error naming it: never another
exception. The site check reads certificates and keys into a failed check, never a traceback.
`FEDISTILL_BAD_INPUT_EXAMPLES` cases per reader (150 by default).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from common.config import ConfigError, load_config
from common.policy import policy_from
from common.tasks import build_task
from common.tasks.text_files import read_texts
from fedistill.certs import make_deployment
from fedistill.check_report import FAIL
from fedistill.connection_check import check_ca_certificate, check_site_key
from tests.common.test_tabular_task import table
from tests.test_bad_input import FUZZ

CELL = st.one_of(st.text(max_size=10), st.integers(-10**9, 10**9).map(str), st.floats().map(str),
                 st.sampled_from(["", '"', '""', "\\", "\t", "\r", "NaN", "inf", "-", "null", "high", "mid", "low",
                                  "north", "True", "1e309"]))
COLUMNS = st.sampled_from(["text", "label", "age", "smoker", "region", "outcome", "", "x", "text,label"])


def delimited(separator: str):
    """A header line of known and unknown columns, then rows of generated cells (ragged too)."""
    header = st.lists(COLUMNS, min_size=1, max_size=5)
    rows = st.lists(st.lists(CELL, max_size=6), max_size=6)
    return st.builds(lambda h, r: "\n".join(separator.join(line) for line in [h, *r]), header, rows)


JSON_LINES = st.lists(st.one_of(
    st.dictionaries(COLUMNS, st.one_of(CELL, st.integers(), st.none(), st.lists(CELL, max_size=2)), max_size=4)
    .map(json.dumps),
    CELL), max_size=6).map("\n".join)
RAW = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode))


def write(folder: Path, name: str, data: bytes | str) -> Path:
    path = folder / name
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


@FUZZ
@given(st.one_of(st.tuples(st.just("csv"), delimited(",")), st.tuples(st.just("tsv"), delimited("\t")),
                 st.tuples(st.just("jsonl"), JSON_LINES), st.tuples(st.sampled_from(["csv", "tsv", "jsonl"]), RAW)))
def test_a_bad_text_file_is_refused_by_name_or_read_as_labelled_texts(tmp_path_factory, file):
    suffix, content = file
    path = write(tmp_path_factory.mktemp("texts"), f"records.{suffix}", content)
    try:
        records = read_texts(path)
    except ConfigError as err:
        assert str(path) in str(err) or "task.data" in str(err), err
        return
    assert records and all(isinstance(r.text, str) and r.text and isinstance(r.label, str) for r in records)


@pytest.fixture(scope="module")
def tabular_task(tmp_path_factory, cache_dir):
    path = tmp_path_factory.mktemp("table") / "survey.csv"
    table().to_csv(path, index=False)
    return build_task(load_config(["task=tabular", f"task.data.path={path}", "task.data.label=outcome",
                                   "task.teacher.max_iter=50", f"cache_dir={cache_dir}"]))


@FUZZ
@given(st.one_of(delimited(","), RAW))
def test_a_bad_table_is_refused_by_name_or_read_as_finite_rows_with_known_labels(tabular_task, tmp_path_factory, content):
    path = write(tmp_path_factory.mktemp("table"), "site.csv", content)
    try:
        data = tabular_task.load_private(path)
    except ConfigError as err:
        assert str(path) in str(err), err
        return
    features, labels = data.tensors
    assert len(features) == len(labels) > 0 and torch.isfinite(features).all()
    assert labels.min() >= 0 and labels.max() < tabular_task.num_classes


@pytest.fixture(scope="module")
def digits_task(cache_dir):
    return build_task(load_config(["task=digits", f"cache_dir={cache_dir}"]))


def npz(members: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


ARRAY = arrays(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64, "U3"]),
               array_shapes(min_dims=0, max_dims=4, max_side=9))
NPZ = st.one_of(
    st.dictionaries(st.sampled_from(["images", "labels", "other"]), ARRAY, max_size=3).map(npz),
    st.builds(lambda images, labels: npz({"images": images, "labels": labels}),
              arrays(np.float32, st.tuples(st.integers(0, 4), st.just(8), st.just(8))),
              arrays(np.int64, st.integers(0, 4))),
    st.builds(lambda data, cut: npz({"images": np.zeros((2, 8, 8)), "labels": np.zeros(2, int)})[:cut],
              st.none(), st.integers(0, 400)),
    st.just(npz({"images": np.array([object()], dtype=object), "labels": np.zeros(1, int)})),
    RAW,
)


@FUZZ
@given(NPZ)
def test_a_bad_npz_is_refused_by_name_or_read_as_images_in_range(digits_task, tmp_path_factory, content):
    path = write(tmp_path_factory.mktemp("npz"), "site.npz", content)
    try:
        data = digits_task.load_private(path)
    except ConfigError as err:
        assert str(path) in str(err), err
        return
    images, labels = data.tensors
    assert len(images) == len(labels) > 0 and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1 and 0 <= labels.min() and labels.max() < digits_task.num_classes


@pytest.fixture(scope="module")
def lm_task(cache_dir, tiny_lm_teacher):
    # the reader is the same whatever the tokenizer; the tiny teacher's needs no GGUF converted first
    task = build_task(load_config(["task=lm", f"task.teacher.path={tiny_lm_teacher}", f"cache_dir={cache_dir}"]))
    return task, len(task.tokenizer)  # the length of a Hugging Face tokenizer is computed at each call


@FUZZ
@given(RAW)
def test_a_bad_source_file_is_refused_by_name_or_read_as_token_ids_in_the_vocabulary(lm_task, tmp_path_factory, content):
    lm_task, vocabulary = lm_task
    path = write(tmp_path_factory.mktemp("code"), "site.py", content)
    try:
        data = lm_task.load_private(path)
    except ConfigError as err:
        assert str(path) in str(err), err
        return
    ids = data.tensors[0]
    assert len(ids) > 0 and ids.min() >= 0 and ids.max() < vocabulary


@pytest.fixture(scope="module")
def real_credentials(tmp_path_factory) -> tuple[bytes, bytes]:
    paths = make_deployment(tmp_path_factory.mktemp("certs"), sites=["site-a"])
    return paths.ca_cert.read_bytes(), paths.site_keys["site-a"].read_bytes()


def damaged(real: bytes, data) -> bytes:
    """A real PEM file cut short, with bytes changed, or with its body replaced."""
    kind = data.draw(st.sampled_from(["cut", "flip", "body", "raw"]))
    if kind == "cut":
        return real[:data.draw(st.integers(0, len(real)))]
    if kind == "flip":
        at = data.draw(st.integers(0, len(real) - 1))
        return real[:at] + bytes([real[at] ^ data.draw(st.integers(1, 255))]) + real[at + 1:]
    if kind == "body":
        lines = real.splitlines()
        return b"\n".join([lines[0], data.draw(st.binary(max_size=80)), lines[-1]])
    return data.draw(RAW)


@FUZZ
@given(st.data())
def test_a_bad_certificate_or_key_fails_the_site_check_with_a_reason(real_credentials, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("site")
    ca, key = real_credentials
    ca_path, key_path = write(folder, "ca.crt", damaged(ca, data)), write(folder, "site.key", damaged(key, data))
    key_path.chmod(0o600)
    policy = policy_from({"supernode": {"superlink": "127.0.0.1:9092", "root_certificates": str(ca_path),
                                        "private_key": str(key_path)}})
    for check, path in ((check_ca_certificate(policy), ca_path), (check_site_key(policy), key_path)):
        if check.status == FAIL:
            assert str(path) in check.detail and check.fix, check
