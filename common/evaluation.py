"""Held-out evaluation: a task's metrics, of the teacher once and of any student.

Each task names its metrics (`Metric`); the first is the headline that progress lines,
plots and tables lead with. Scores are plain {metric name: value} dicts, so the server,
the run directory and the benchmarks need no branch on the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from common.device import CPU, placed
from common.losses import LOGITS

Scores = dict[str, float]


@dataclass(frozen=True)
class Metric:
    name: str                      # its key in the scores
    label: str                     # how tables and plots name it
    higher_is_better: bool = True
    unit_interval: bool = True     # a share in [0, 1] (plotted on a 0-1 axis)


class Evaluator(Protocol):
    metrics: tuple[Metric, ...]    # the first is the headline
    teacher: Scores

    def __call__(self, model: nn.Module) -> Scores: ...


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512, device: torch.device = CPU) -> torch.Tensor:
    """The model's outputs on `inputs`, in eval mode and batches, run on `device`: [N, ...] -> [N, C] on the CPU."""
    model.eval()
    with placed(model, device) as where:
        if not len(inputs):
            return model(inputs.to(where)).cpu()
        return torch.cat([model(x.to(where)).cpu() for x in inputs.split(batch_size)])


class ClassifierEvaluator:
    """A classifier on the task's test set: accuracy, agreement with the teacher's top-1, loss.
    The teacher's logits come from the task once."""

    metrics = (Metric("accuracy", "test accuracy"), Metric("agreement", "agreement with teacher"),
               Metric("loss", "test loss", higher_is_better=False, unit_interval=False))

    def __init__(self, task):
        self.device = task.device
        self.inputs, self.labels = task.test_data().tensors
        self.teacher_logits = task.teacher_targets(self.inputs, (LOGITS,))[LOGITS]
        self.teacher = self.score(self.teacher_logits)

    def score(self, logits: torch.Tensor) -> Scores:
        predictions = logits.argmax(dim=-1)
        return {
            "accuracy": (predictions == self.labels).float().mean().item(),
            "agreement": (predictions == self.teacher_logits.argmax(dim=-1)).float().mean().item(),
            "loss": F.cross_entropy(logits.float(), self.labels).item(),
        }

    def __call__(self, model: nn.Module) -> Scores:
        return self.score(predict(model, self.inputs, device=self.device))
