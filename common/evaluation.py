"""Held-out evaluation of a classifier against labels and against the teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from common.losses import LOGITS
from common.tasks import Task


@dataclass(frozen=True)
class Evaluation:
    accuracy: float   # top-1 against the labels
    loss: float       # mean cross-entropy against the labels
    agreement: float  # share of samples where the model's top-1 equals the teacher's


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs on `inputs`, in eval mode and batches: [N, ...] -> [N, C]."""
    model.eval()
    return torch.cat([model(x) for x in inputs.split(batch_size)]) if len(inputs) else model(inputs)


class Evaluator:
    """Evaluates models on the task's test set; the teacher's predictions come from the task once."""

    def __init__(self, task: Task):
        self.inputs, self.labels = task.test_data().tensors
        self.teacher_logits = task.teacher_targets(self.inputs, (LOGITS,))[LOGITS]
        self.teacher = self.score(self.teacher_logits)

    def score(self, logits: torch.Tensor) -> Evaluation:
        predictions = logits.argmax(dim=-1)
        return Evaluation(
            accuracy=(predictions == self.labels).float().mean().item(),
            loss=F.cross_entropy(logits.float(), self.labels).item(),
            agreement=(predictions == self.teacher_logits.argmax(dim=-1)).float().mean().item(),
        )

    def __call__(self, model: nn.Module) -> Evaluation:
        return self.score(predict(model, self.inputs))
