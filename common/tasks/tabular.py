"""Tabular classification: a CSV or Parquet table, a gradient-boosted teacher, an MLP student.

One table (`task.data.path`) is split as the other tasks split theirs: teacher / public
(rows without labels) / test / the sites' private part; at a real site its `data_path` is a
table of its own records with the same columns. The feature encoding (`table_encoding`) is
fitted on the teacher split only and travels with the exported student. The teacher is scikit-learn's HistGradientBoostingClassifier on the encoded features, fitted
once and cached; the student an MLP over them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.config import Config, ConfigError, DistillConfig, ExchangeConfig, StudentConfig, require
from common.task_config import FrontierSetting, FrontierTarget, TaskConfig, absolute_path
from common.evaluation import ClassifierEvaluator
from common.losses import DistillationObjective
from common.models.image import StudentMLP
from common.partition import partition_description, site_share, split_parts
from common.public_outputs import ClassOutputs, class_outputs
from common.storage import atomic_write, filling, save_model, write_json
from common.tasks.image import logits_only_targets, student_hidden
from common.tasks.table_encoding import Encoding, TableConfig, feature_columns, read_table

log = logging.getLogger(__name__)

MIN_PROBABILITY = 1e-6  # the teacher's log-probabilities stay finite


@dataclass
class BoostingConfig:
    """The gradient-boosted teacher (scikit-learn's HistGradientBoostingClassifier)."""

    path: str | None = None  # a saved teacher is not read: it is fitted on the teacher split
    max_iter: int = 300
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    l2_regularization: float = 0.0

    def validate(self) -> None:
        require(self.path is None, f"task=tabular fits its teacher on the teacher split; it reads no saved teacher "
                                   f"(task.teacher.path / the site's teacher_path), got {self.path!r}")
        require(self.max_iter >= 1, f"task.teacher.max_iter must be >= 1, got {self.max_iter}")
        require(self.learning_rate > 0, f"task.teacher.learning_rate must be > 0, got {self.learning_rate}")
        require(self.max_leaf_nodes >= 2, f"task.teacher.max_leaf_nodes must be >= 2, got {self.max_leaf_nodes}")
        require(self.l2_regularization >= 0, f"task.teacher.l2_regularization must be >= 0, got {self.l2_regularization}")


SHARED = "{data}/tabular"


@dataclass
class TabularTaskConfig(TaskConfig):
    teacher: BoostingConfig = field(default_factory=BoostingConfig)
    data: TableConfig = field(default_factory=TableConfig)

    students = ("mlp",)
    frontiers = (
        FrontierSetting("doctor-contacts-health", ("task=tabular", f"task.data.path={SHARED}/doctor_contacts.csv",
                                                   "task.data.label=health"), (1.0, 3.0), needs="tabular"),
        FrontierSetting("vietnam-health-insurance", ("task=tabular", f"task.data.path={SHARED}/vietnam_health.csv",
                                                     "task.data.label=insurance"), (1.0, 3.0), needs="tabular"),
    )
    frontier_targets = tuple(
        FrontierTarget(f"{name}: epsilon 3 keeps >= 90% of the teacher's accuracy", (name, 3.0), (name, "teacher"),
                       share=0.9)
        for name in ("doctor-contacts-health", "vietnam-health-insurance"))

    def validate(self) -> None:
        super().validate()
        self.teacher.validate()
        self.data.validate()

    def site_settings(self) -> dict:
        return {**super().site_settings(), "data": {**asdict(self.data), "path": absolute_path(self.data.path)}}

    def build(self, config: Config) -> TabularTask:
        return TabularTask(config)


CONFIG = TabularTaskConfig


class BoostedTeacher(nn.Module):
    """A fitted HistGradientBoostingClassifier as a module: features [B, F] -> log-probabilities
    [B, C]. Its pickled bytes are a buffer, so that its size on disk counts in the run's summary."""

    def __init__(self, model, blob: bytes, num_classes: int):
        super().__init__()
        self.model, self.num_classes = model, num_classes
        self.register_buffer("blob", torch.frombuffer(bytearray(blob), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = self.model.predict_proba(x.detach().cpu().numpy().astype(np.float64))
        probabilities = np.full((len(x), self.num_classes), MIN_PROBABILITY)
        probabilities[:, self.model.classes_] = np.maximum(seen, MIN_PROBABILITY)  # a class the split lacks stays ~0
        return torch.from_numpy(np.log(probabilities)).float()


class TabularTask:
    """A table split teacher / public (rows without labels) / test / private, one site per share."""

    tokens_per_example = None  # one prediction per example

    def __init__(self, config: Config):
        self.config = config.task
        self.data = config.task.data
        self.name = config.task.name
        self.seed = config.seed
        self.cache_dir = config.cache_path
        self._teacher: BoostedTeacher | None = None

    @cached_property
    def _table(self) -> pd.DataFrame:
        path = Path(self.data.path).expanduser()
        rows = read_table(path)
        if self.data.label not in rows.columns:
            raise ConfigError(f"table {path} has no column {self.data.label!r} (task.data.label); its columns are "
                              f"{', '.join(map(str, rows.columns))}")
        unlabelled = rows[self.data.label].isna()
        if unlabelled.any():
            log.info("table %s: %d rows without a label are left out", path, int(unlabelled.sum()))
        if not feature_columns(rows, self.data):
            raise ConfigError(f"table {path} has no feature column besides the label {self.data.label!r}")
        return rows[~unlabelled].reset_index(drop=True)

    @cached_property
    def _digest(self) -> str:
        return hashlib.sha256(pd.util.hash_pandas_object(self._table, index=False).to_numpy().tobytes()
                              + json.dumps(list(map(str, self._table.columns))).encode()).hexdigest()

    @cached_property
    def _indices(self) -> dict[str, np.ndarray]:
        return split_parts(len(self._table), self.config.split, self.seed)

    @cached_property
    def encoding(self) -> Encoding:
        classes = sorted(self._table[self.data.label].astype(str).unique().tolist())
        encoding = Encoding.fit(self._table.iloc[self._indices["teacher"]], self.data, classes)
        log.info("task %s: %d rows, %d classes, %d features (%d numeric, %d with a missing flag, %d categorical)",
                 self.name, len(self._table), len(classes), encoding.width, len(encoding.numeric),
                 len(encoding.flagged), len(encoding.categorical))
        return encoding

    @cached_property
    def _parts(self) -> dict[str, TensorDataset]:
        where = f"table {self.data.path}"
        x = self.encoding.features(self._table, where=where)
        y = self.encoding.labels(self._table, where=where)
        return {name: TensorDataset(x[idx], y[idx]) for name, idx in self._indices.items()}

    @property
    def num_classes(self) -> int:
        return len(self.encoding.classes)

    def private_data(self, site: int, num_sites: int) -> TensorDataset:
        return site_share(self._parts["private"], site, num_sites, alpha=self.config.dirichlet_alpha, seed=self.seed,
                          sites_per_record=self.config.sites_per_record)

    def partition_identity(self, num_sites: int) -> tuple[str, str]:
        return f"table {self._digest[:16]}", partition_description(self.config, self.seed, num_sites)

    def load_private(self, path: Path) -> TensorDataset:
        rows = read_table(path)
        where = f"site data {path}"
        if rows.empty:
            raise ConfigError(f"{where} holds no records")
        return TensorDataset(self.encoding.features(rows, where=where), self.encoding.labels(rows, where=where))

    def public_inputs(self) -> torch.Tensor:
        return self._parts["public"].tensors[0]

    def public_labels(self) -> None:
        return None  # the public part is rows without labels

    def transfer_inputs(self, count: int, seed: int) -> torch.Tensor:
        """Rows whose every column is taken from an independently drawn public row: new
        combinations of public values, no site's record among them."""
        public, generator = self.public_inputs(), torch.Generator().manual_seed(seed)
        rows = torch.empty(count, public.shape[1])
        for block in self.encoding.blocks():
            donors = torch.randint(len(public), (count,), generator=generator)
            rows[:, block] = public[donors, block]
        return rows

    def public_outputs(self, exchange: ExchangeConfig) -> ClassOutputs:
        return class_outputs(self, exchange)

    def test_data(self) -> TensorDataset:
        return self._parts["test"]

    def student(self, config: StudentConfig) -> nn.Module:
        return StudentMLP((self.encoding.width,), self.num_classes, config.hidden)

    def teacher_targets(self, inputs: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return logits_only_targets(self.teacher, inputs, kinds, kind="tabular")

    def objective(self, distill: DistillConfig) -> nn.Module:
        return DistillationObjective(distill)

    def evaluator(self) -> ClassifierEvaluator:
        return ClassifierEvaluator(self)

    def export(self, student: nn.Module, folder: Path) -> None:
        from common.models.hf_export import export_mlp_student  # transformers, only when a run ends

        described = {"task": self.name, "num_features": self.encoding.width, "num_classes": self.num_classes,
                     "hidden": student_hidden(student), "encoding": asdict(self.encoding)}
        save_model(folder / "student.safetensors", student)
        write_json(folder / "student.json", described)
        export_mlp_student(folder / "student", student, described | {"input_shape": [self.encoding.width]})

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self._load_or_fit_teacher()
        return self._teacher

    def teacher_digest(self) -> str:
        return hashlib.sha256(f"{self._teacher_key()} {self._digest}".encode()).hexdigest()

    def _teacher_key(self) -> str:
        facts = {"version": 1, "split": asdict(self.config.split), "teacher": asdict(self.config.teacher),
                 "data": asdict(self.data) | {"path": None}, "seed": self.seed, "sklearn": sklearn.__version__}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]

    def _load_or_fit_teacher(self) -> BoostedTeacher:
        # The cache is the site's own folder, written by this code: unpickling it runs nothing a
        # coordinator chose.
        path = self.cache_dir / f"teacher-{self.name}-{self._teacher_key()}-{self._digest[:16]}.pkl"
        with filling(path):
            if path.exists():
                blob = path.read_bytes()
            else:
                log.info("Fitting the %s teacher (gradient-boosted trees) once; it is cached at %s", self.name, path)
                blob = pickle.dumps(self._fit_teacher())
                atomic_write(path, blob)
        teacher = BoostedTeacher(pickle.loads(blob), blob, self.num_classes)
        teacher.eval()
        return teacher

    def _fit_teacher(self):
        from sklearn.ensemble import HistGradientBoostingClassifier

        cfg = self.config.teacher
        x, y = self._parts["teacher"].tensors
        model = HistGradientBoostingClassifier(max_iter=cfg.max_iter, learning_rate=cfg.learning_rate,
                                               max_leaf_nodes=cfg.max_leaf_nodes, l2_regularization=cfg.l2_regularization,
                                               early_stopping=True, random_state=self.seed)
        return model.fit(x.numpy().astype(np.float64), y.numpy())
