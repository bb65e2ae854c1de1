"""Tasks: everything domain-specific behind one interface, one module per kind (`task.kind`).

A task owns its data format and split, what the teacher contributes per record (computed
once), the distillation objective, what its students output and how the final student is
exported. Client, server, exchanges and benchmarks only call the `Task` protocol.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.config import Config, ConfigError, DistillConfig, ExchangeConfig, StudentConfig
from common.device import torch_device

if TYPE_CHECKING:
    from common.evaluation import Evaluator
    from common.public_outputs import PublicOutputs


class Task(Protocol):
    """What the server and the sites need to know about a domain."""

    name: str
    device: torch.device  # where its heavy passes run: the run's `device` (build_task sets it)
    tokens_per_example: int | None  # predictions one example's forward makes, where more than one (a causal LM's)

    def private_data(self, site: int, num_sites: int) -> TensorDataset:
        """(inputs, labels) of site `site` of `num_sites` in simulation (never leave it)."""

    def partition_identity(self, num_sites: int) -> tuple[str, str]:
        """(data set, partition) that `private_data` cuts records from: what a privacy ledger keys on."""

    def load_private(self, path: Path) -> TensorDataset:
        """A site's own (inputs, labels) from `path` (its policy's `data_path`)."""

    def public_inputs(self) -> torch.Tensor:
        """Inputs, without labels, that every site and the server may use."""

    def public_labels(self) -> torch.Tensor | None:
        """Labels of the public inputs that are public themselves (a causal LM's next tokens), or None."""

    def transfer_inputs(self, count: int, seed: int) -> torch.Tensor:
        """`count` free inputs made from the public ones (common/transfer.py), for the server's
        distillation toward the teacher: no site's record enters them."""

    def public_outputs(self, exchange: ExchangeConfig) -> "PublicOutputs":
        """What its students say about the public inputs in the logits exchange (common.public_outputs)."""

    def test_data(self) -> TensorDataset:
        """The server's held-out (inputs, labels)."""

    def teacher(self) -> nn.Module:
        """The shared, fitted teacher in eval mode with frozen parameters: inputs -> logits [B, C]."""

    def teacher_digest(self) -> str:
        """SHA-256 of what the teacher is made from (its pretrained files, or the data and settings
        it is fitted from): the server announces it, a site whose teacher differs refuses."""

    def teacher_targets(self, inputs: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """What the teacher contributes per record of `inputs`, for each of `kinds` (see
        common.losses): computed once, cached where that is costly."""

    def student(self, config: StudentConfig) -> nn.Module:
        """A freshly initialised student: inputs -> logits [B, C]."""

    def objective(self, distill: DistillConfig) -> nn.Module:
        """The local training loss: objective(student, inputs, labels, targets) -> scalar,
        with `target_kinds` naming the teacher targets it reads."""

    def evaluator(self) -> "Evaluator":
        """The server's held-out evaluation (common.evaluation): the task's metrics, teacher scored once."""

    def export(self, student: nn.Module, folder: Path) -> None:
        """Write the student to `folder` in the form its users load for inference."""


def build_task(config: Config) -> Task:
    """The task `config` names: its kind's (common/tasks/<kind>.py builds it), or a
    `package.module:factory` source's, which the site must list in its task_sources."""
    source = config.task.source
    if ":" not in source:
        task = config.task.build(config)
    else:
        module_name, _, attr = source.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"task.source {source!r} cannot be imported: {err}") from None
        task = factory(config)
    task.device = torch_device(config.device)
    return task
