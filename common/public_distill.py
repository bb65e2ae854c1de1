"""Server-side distillation of the global student on the public inputs (FedDF / FedMD / DS-FL)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from common.config import ServerDistillConfig


@dataclass(frozen=True)
class DistillReport:
    epochs: int             # epochs run before early stopping
    holdout_loss: float     # best KL on the held-out slice of the public inputs


def soft_kl(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(target / T) || softmax(student / T)), mean over the batch. [B, C], [B, C] -> scalar."""
    t = temperature
    return t * t * F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(target_logits / t, dim=-1),
        reduction="batchmean", log_target=True,
    )


def distill_on_public(
    student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: ServerDistillConfig, *, seed: int
) -> DistillReport:
    """Fit `student` in place to `targets` [P, C] on `inputs` [P, ...] with early stopping.

    A seeded slice of `config.holdout` of the inputs is held out; the student with the
    lowest held-out KL is kept.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)
    n_hold = max(1, int(round(config.holdout * len(inputs))))
    hold, train = order[:n_hold], order[n_hold:]
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    best_loss, best_state = _holdout_loss(student, inputs[hold], targets[hold], config), copy.deepcopy(student.state_dict())
    stale, epochs = 0, 0
    for epochs in range(1, config.epochs + 1):
        student.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(config.batch_size):
            optimizer.zero_grad()
            soft_kl(student(inputs[batch]), targets[batch], config.temperature).backward()
            optimizer.step()
        loss = _holdout_loss(student, inputs[hold], targets[hold], config)
        if loss < best_loss:
            best_loss, best_state, stale = loss, copy.deepcopy(student.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    student.load_state_dict(best_state)
    student.eval()
    return DistillReport(epochs=epochs, holdout_loss=best_loss)


@torch.no_grad()
def _holdout_loss(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: ServerDistillConfig) -> float:
    student.eval()
    return soft_kl(student(inputs), targets, config.temperature).item()
