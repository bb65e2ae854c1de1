"""Held-out evaluation of a classifier against labels and against the teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class Evaluation:
    accuracy: float   # top-1 against the labels
    loss: float       # mean cross-entropy against the labels
    agreement: float  # share of samples where the model's top-1 equals the teacher's


class Evaluator:
    """Evaluates models on one test set; the teacher's predictions are computed once."""

    def __init__(self, test: TensorDataset, teacher: nn.Module, batch_size: int = 1024):
        self.inputs, self.labels = test.tensors
        self.batch_size = batch_size
        self.teacher_logits = self.logits(teacher)
        self.teacher = self.score(self.teacher_logits)

    @torch.no_grad()
    def logits(self, model: nn.Module) -> torch.Tensor:  # -> [N, C]
        model.eval()
        return torch.cat([model(x) for x in self.inputs.split(self.batch_size)])

    def score(self, logits: torch.Tensor) -> Evaluation:
        predictions = logits.argmax(dim=-1)
        return Evaluation(
            accuracy=(predictions == self.labels).float().mean().item(),
            loss=F.cross_entropy(logits, self.labels).item(),
            agreement=(predictions == self.teacher_logits.argmax(dim=-1)).float().mean().item(),
        )

    def __call__(self, model: nn.Module) -> Evaluation:
        return self.score(self.logits(model))
