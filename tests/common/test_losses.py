import math

import pytest
import torch
from torch.nn import functional as F

from common.config import load_config
from common.losses import FEATURES, LOGITS, AttentionLoss, DistillationObjective, FeatureLoss, SoftLabelLoss


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
    loss = SoftLabelLoss(temperature=2.0, alpha=0.5)(student, teacher, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_a_per_sample_mean():
    # Opacus expects loss_reduction="mean": the batch loss is the mean of per-sample losses.
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    loss_fn = SoftLabelLoss(temperature=3.0, alpha=0.7)
    per_sample = [loss_fn(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1]) for i in range(5)]
    assert loss_fn(student, teacher, labels).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_alpha_one_ignores_labels():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    labels = torch.tensor([0, 1, 2])
    assert SoftLabelLoss(temperature=4.0, alpha=0.0)(student, teacher, labels).item() == pytest.approx(
        F.cross_entropy(student, labels).item()
    )
    one = SoftLabelLoss(temperature=4.0, alpha=1.0)
    assert one(student, teacher, labels).item() == pytest.approx(one(student, teacher, torch.tensor([4, 4, 4])).item())
    assert one(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_loss_is_one_minus_cosine_per_sample_mean():
    torch.manual_seed(2)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    expected = (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    assert FeatureLoss()(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    assert FeatureLoss()(teacher * 3, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_loss_is_zero_for_equal_maps_and_ignores_padded_queries():
    torch.manual_seed(3)
    keep = torch.tensor([[True, True, True, False], [True, True, False, False]])
    scores = torch.randn(2, 4, 4).masked_fill(~keep[:, None, :], float("-inf"))
    maps = scores.softmax(dim=-1)
    assert AttentionLoss()([maps], maps[:, None], keep).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 4, 4).masked_fill(~keep[:, None, :], float("-inf")).softmax(dim=-1)
    changed = other.clone()
    changed[0, 3] = maps[0, 3]  # a padded query row: not part of the loss
    loss = AttentionLoss()([changed], maps[:, None], keep)
    assert loss.item() == pytest.approx(AttentionLoss()([other], maps[:, None], keep).item(), rel=1e-6)
    per_sample = [AttentionLoss()([other[i:i + 1]], maps[i:i + 1, None], keep[i:i + 1]) for i in range(2)]
    assert AttentionLoss()([other], maps[:, None], keep).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-6)
