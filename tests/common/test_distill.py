import math

import pytest
import torch
from torch.nn import functional as F

from common.distill import DistillationLoss


def test_loss_matches_hand_computed_value():
    # One sample, two classes, T = 2, alpha = 0.5.
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    labels = torch.tensor([0])
    p_t = [math.exp(0) / (math.exp(0) + math.exp(1)), math.exp(1) / (math.exp(0) + math.exp(1))]
    p_s = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    ce = -math.log(math.exp(1) / (math.exp(1) + 1))
    expected = 0.5 * 4 * kl + 0.5 * ce
    loss = DistillationLoss(temperature=2.0, alpha=0.5)(student, teacher, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_a_per_sample_mean():
    # Opacus expects loss_reduction="mean": the batch loss is the mean of per-sample losses.
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    loss_fn = DistillationLoss(temperature=3.0, alpha=0.7)
    per_sample = [loss_fn(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1]) for i in range(5)]
    assert loss_fn(student, teacher, labels).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_alpha_one_ignores_labels():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    labels = torch.tensor([0, 1, 2])
    assert DistillationLoss(temperature=4.0, alpha=0.0)(student, teacher, labels).item() == pytest.approx(
        F.cross_entropy(student, labels).item()
    )
    one = DistillationLoss(temperature=4.0, alpha=1.0)
    assert one(student, teacher, labels).item() == pytest.approx(one(student, teacher, torch.tensor([4, 4, 4])).item())
    assert one(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_empty_batch_gives_zero_loss_that_reaches_the_parameters():
    layer = torch.nn.Linear(3, 2)
    loss = DistillationLoss(temperature=2.0, alpha=0.5)(layer(torch.zeros(0, 3)), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert layer.weight.grad is not None and torch.all(layer.weight.grad == 0)
