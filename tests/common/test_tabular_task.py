"""task=tabular: a table read with clear errors, an encoding fitted on the teacher split, a boosted teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import ConfigError, load_config
from common.tasks import build_task
from common.tasks.table_encoding import Encoding, TableConfig
from tests.hf_loading import predict_without_fedistill


def table(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    """A survey-like table: numeric, boolean and text columns, a row-number column, and a label
    that the features decide."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 80, rows)
    smoker = rng.random(rows) < 0.3
    region = rng.choice(["north", "south", "east", "west"], rows)
    score = (age - 50) / 15 + 1.5 * smoker + (region == "north") + rng.normal(0, 0.3, rows)
    label = np.where(score > 1, "high", np.where(score > -0.5, "mid", "low"))
    return pd.DataFrame({"": np.arange(rows), "age": age, "smoker": smoker, "region": region, "outcome": label})


@pytest.fixture
def survey(tmp_path) -> str:
    path = tmp_path / "survey.csv"
    table().to_csv(path, index=False)
    return str(path)


def overrides(path: str, tmp_path, cache_dir, *more: str) -> list[str]:
    return ["task=tabular", f"task.data.path={path}", "task.data.label=outcome", "task.teacher.max_iter=50",
            "sites=2", f"run_dir={tmp_path / 'run'}", f"cache_dir={cache_dir}", *more]


def test_the_encoding_standardises_numbers_one_hots_categories_and_flags_missing_values():
    rows = pd.DataFrame({"x": [1.0, 2.0, None, 5.0], "kind": ["a", "b", "a", None], "y": ["u", "v", "u", "v"]})
    encoding = Encoding.fit(rows, TableConfig(path="t.csv", label="y", numeric_bins=0), ["u", "v"])
    assert encoding.flagged == ["x"] and encoding.categorical == {"kind": ["a", "b"]}
    features = encoding.features(pd.DataFrame({"x": [None, 2.0], "kind": ["b", "zebra"]}), where="test")
    median, mean, std = encoding.numeric["x"]
    assert features.shape == (2, encoding.width) == (2, 2 + 3)
    assert features[0, 0].item() == pytest.approx((median - mean) / std) and features[0, 1] == 1  # imputed, flagged
    assert features[1, 1] == 0
    assert features[0, 2:].tolist() == [0, 1, 0] and features[1, 2:].tolist() == [0, 0, 1]  # "zebra": the other slot


def test_a_number_gets_a_one_hot_of_its_quantile_bin_beside_it_in_its_columns_block():
    rows = pd.DataFrame({"x": np.arange(100.0), "kind": ["a", "b"] * 50, "y": ["u"] * 100})
    encoding = Encoding.fit(rows, TableConfig(path="t.csv", label="y", numeric_bins=4), ["u"])
    assert encoding.bins == {"x": [24.75, 49.5, 74.25]}  # the teacher split's quartiles
    features = encoding.features(pd.DataFrame({"x": [-5.0, 30.0, 49.5, 200.0, None], "kind": ["a"] * 5}), where="test")
    assert features.shape == (5, encoding.width) == (5, 1 + 4 + 3)
    assert features[:, 1:5].argmax(1).tolist() == [0, 1, 2, 3, 2] and features[:, 1:5].sum(1).tolist() == [1] * 5
    assert encoding.blocks() == [slice(0, 5), slice(5, 8)]  # transfer rows keep a value with its bin


def test_rare_categories_share_the_other_slot():
    rows = pd.DataFrame({"c": ["a"] * 5 + ["b"] * 3 + ["c"], "y": ["u"] * 9})
    encoding = Encoding.fit(rows, TableConfig(path="t.csv", label="y", max_categories=2), ["u"])
    assert encoding.categorical == {"c": ["a", "b"]}
    assert encoding.features(pd.DataFrame({"c": ["c"]}), where="test").tolist() == [[0, 0, 1]]


def test_a_site_table_without_a_column_or_with_an_unknown_label_is_refused_by_name(survey, tmp_path, cache_dir):
    task = build_task(load_config(overrides(survey, tmp_path, cache_dir)))
    mine = table(50, seed=1)
    mine.drop(columns=["region"]).to_csv(tmp_path / "no-region.csv", index=False)
    with pytest.raises(ConfigError, match=r"lacks the columns \['region'\]"):
        task.load_private(tmp_path / "no-region.csv")
    mine.assign(outcome="unheard").to_csv(tmp_path / "label.csv", index=False)
    with pytest.raises(ConfigError, match=r"labels \['unheard'\] are not among the task's classes"):
        task.load_private(tmp_path / "label.csv")
    mine.assign(age="old").to_csv(tmp_path / "text-age.csv", index=False)
    with pytest.raises(ConfigError, match="column 'age' holds 50 values that are not numbers.*task.data.categorical"):
        task.load_private(tmp_path / "text-age.csv")
    mine.to_csv(tmp_path / "mine.csv", index=False)
    records = task.load_private(tmp_path / "mine.csv")
    assert records.tensors[0].shape == (50, task.encoding.width) and records.tensors[1].max() < task.num_classes


def test_a_table_of_another_format_or_without_the_label_gets_the_fix(survey, tmp_path, cache_dir):
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="'.xlsx' is not one of .csv, .parquet"):
        build_task(load_config(overrides(str(tmp_path / "t.xlsx"), tmp_path, cache_dir))).test_data()
    with pytest.raises(ConfigError, match="has no column 'target'.*its columns are"):
        build_task(load_config(overrides(survey, tmp_path, cache_dir, "task.data.label=target"))).test_data()
    with pytest.raises(ConfigError, match="needs a table: task.data.path"):
        load_config(["task=tabular"])
    with pytest.raises(ConfigError, match="reads no saved teacher"):
        load_config(overrides(survey, tmp_path, cache_dir, "task.teacher.path=/x.pkl"))


def test_the_boosted_teacher_learns_the_table_and_is_fitted_once(survey, tmp_path, cache_dir):
    task = build_task(load_config(overrides(survey, tmp_path, cache_dir)))
    scores = task.evaluator().teacher
    assert scores["accuracy"] > 0.8  # the label is a function of the features, plus a little noise
    logits = task.teacher_targets(task.public_inputs(), ("logits",))["logits"]
    assert logits.shape == (len(task.public_inputs()), 3) and torch.allclose(logits.exp().sum(1), torch.ones(len(logits)), atol=1e-4)
    assert list(Path(cache_dir).glob("teacher-tabular-*.pkl"))
    again = build_task(load_config(overrides(survey, tmp_path, cache_dir)))
    again._fit_teacher = None  # a second task reads the cache: fitting again would fail
    assert torch.equal(again.teacher_targets(task.public_inputs(), ("logits",))["logits"], logits)


def test_free_inputs_take_each_column_from_some_public_row(survey, tmp_path, cache_dir):
    task = build_task(load_config(overrides(survey, tmp_path, cache_dir)))
    public, made = task.public_inputs(), task.transfer_inputs(200, seed=3)
    assert torch.equal(made, task.transfer_inputs(200, seed=3))
    for block in task.encoding.blocks():
        known = {tuple(row) for row in public[:, block].tolist()}
        assert all(tuple(row) in known for row in made[:, block].tolist())
    assert not {tuple(r) for r in made.tolist()} <= {tuple(r) for r in public.tolist()}  # new combinations


def test_the_export_holds_the_student_and_the_encoding(survey, tmp_path, cache_dir):
    config = load_config(overrides(survey, tmp_path, cache_dir))
    task = build_task(config)
    task.export(task.student(config.student), tmp_path)
    saved = json.loads((tmp_path / "student.json").read_text())
    assert saved["encoding"]["categorical"]["region"] == ["east", "north", "south", "west"]
    assert saved["encoding"]["classes"] == ["high", "low", "mid"] and saved["num_features"] == task.encoding.width
    assert (tmp_path / "student.safetensors").exists()


def test_the_exported_student_loads_with_transformers_alone(survey, tmp_path, cache_dir):
    config = load_config(overrides(survey, tmp_path, cache_dir))
    task = build_task(config)
    student = task.student(config.student).eval()
    task.export(student, tmp_path)
    rows = task.test_data().tensors[0][:3]
    answer = predict_without_fedistill(tmp_path / "student", "AutoModel", inputs=rows.tolist())
    with torch.no_grad():
        assert torch.allclose(torch.tensor(answer["logits"]), student(rows), atol=1e-5)
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["encoding"]["classes"] == ["high", "low", "mid"]  # how to encode a row, for its users


def test_parquet_tables_are_read_like_csv_ones(survey, tmp_path, cache_dir):
    pytest.importorskip("pyarrow", reason="pandas reads Parquet through pyarrow")
    path = tmp_path / "survey.parquet"
    pd.read_csv(survey).to_parquet(path)
    csv_task = build_task(load_config(overrides(survey, tmp_path, cache_dir)))
    parquet_task = build_task(load_config(overrides(str(path), tmp_path, cache_dir)))
    assert torch.equal(csv_task.test_data().tensors[0], parquet_task.test_data().tensors[0])
