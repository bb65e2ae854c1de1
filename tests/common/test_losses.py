import math

import pytest
import torch
from torch.nn import functional as F

from common.losses import AttentionLoss, FeatureLoss, SoftLabelLoss, TokenDistillLoss


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


def _token_case(vocabulary=12, k=3):
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, vocabulary).mul(2).log_softmax(-1)
    top = teacher.topk(k, dim=-1)
    labels = torch.randint(0, vocabulary, (2, 5))
    labels[1, 3:] = -100  # padding
    return teacher, top.values, top.indices, labels


def test_token_kd_is_the_kl_of_the_top_k_and_the_rest_at_temperature_one():
    teacher, values, ids, labels = _token_case()
    student = torch.randn(2, 5, 12)
    q = student.softmax(-1)
    p_top, q_top = values.exp(), q.gather(-1, ids)
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    r = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    per_position = (p * (p / r).log()).sum(-1)
    real = (labels != -100).float()
    expected = ((per_position * real).sum(-1) / real.sum(-1)).mean()
    assert TokenDistillLoss(temperature=1.0, alpha=1.0)(student, labels, values, ids).item() == pytest.approx(
        expected.item(), rel=1e-5)


def test_token_kd_does_not_push_the_rest_of_the_mass_onto_the_top_k():
    # The teacher's own distribution scores 0; the same top-k ratios with the rest moved onto
    # them (what a KL renormalised over the top-k cannot tell apart) score worse.
    teacher, values, ids, labels = _token_case()
    loss = TokenDistillLoss(temperature=1.0, alpha=1.0)
    assert loss(teacher, labels, values, ids).item() == pytest.approx(0.0, abs=1e-5)
    peaked = teacher.scatter(-1, ids, values + 5.0)
    assert loss(peaked, labels, values, ids).item() > 0.1


def test_token_kd_merges_repeated_ids_into_one_bucket():
    # Two of the teacher's top-k tokens outside the student's vocabulary both map to its unknown
    # token 0: one bucket holding both probabilities.
    _, values, ids, labels = _token_case()
    student = torch.randn(2, 5, 12)
    repeated = ids.clone()
    repeated[..., 1:] = 0
    merged_values = torch.stack([values[..., 0], values[..., 1:].logsumexp(-1), torch.full_like(values[..., 0], -30.0)], -1)
    merged_ids = torch.stack([ids[..., 0], torch.zeros_like(ids[..., 0]), torch.full_like(ids[..., 0], -1)], -1)
    loss = TokenDistillLoss(temperature=2.0, alpha=0.5)
    assert loss(student, labels, values, repeated).item() == pytest.approx(
        loss(student, labels, merged_values, merged_ids).item(), rel=1e-5)
