"""Distillation losses, written so that Opacus can compute per-sample gradients."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DistillationLoss(nn.Module):
    """Hinton KD blended with hard labels.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

    Both terms are means over the batch (KL with `batchmean`), matching Opacus's
    `loss_reduction="mean"`; T^2 keeps the soft term's gradient scale independent of T.

    Shapes: student_logits [B, C], teacher_logits [B, C], labels [B] -> scalar.
    """

    def __init__(self, *, temperature: float, alpha: float):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if student_logits.shape[0] == 0:
            # An empty Poisson batch: a zero loss that still reaches every parameter,
            # so the DP step adds its noise as the accountant assumes.
            return student_logits.sum() * 0.0
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        hard = F.cross_entropy(student_logits, labels)
        return self.alpha * t * t * soft + (1.0 - self.alpha) * hard
