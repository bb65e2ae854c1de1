import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from client.dp_train import distill_locally, plan_round
from common.models import StudentMLP


def _data(n=96):
    torch.manual_seed(0)
    x = torch.rand(n, 1, 8, 8)
    y = torch.randint(0, 10, (n,))
    return TensorDataset(x, y, torch.randn(n, 10))


def _train(small_config, *, privacy, noise=None, seed=0):
    data = _data()
    torch.manual_seed(123)
    student = StudentMLP((1, 8, 8), 10, [16])
    plan = plan_round(len(data), small_config.distill)
    result = distill_locally(student, data, distill=small_config.distill, privacy=privacy,
                             noise_multiplier=noise, plan=plan, seed=seed)
    return student, result, plan


def test_plan_uses_opacus_sample_rate(small_config):
    plan = plan_round(100, dataclasses.replace(small_config.distill, batch_size=32, local_epochs=2))
    assert plan.sample_rate == 1 / 4 and plan.steps == 8


def test_dp_training_takes_the_planned_steps_and_keeps_clean_keys(small_config):
    student, result, plan = _train(small_config, privacy=small_config.privacy, noise=1.0)
    assert result.steps == plan.steps
    assert set(student.state_dict()) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    assert not hasattr(student.net[1].weight, "grad_sample") or student.net[1].weight.grad_sample is None


def test_plan_matches_opacus_where_its_sampler_rounds_down(small_config):
    # 185 records in batches of 2 is 93 batches, but Opacus's Poisson loader yields 92 steps.
    distill = dataclasses.replace(small_config.distill, batch_size=2, local_epochs=1)
    data = TensorDataset(torch.rand(185, 1, 8, 8), torch.randint(0, 10, (185,)), torch.randn(185, 10))
    plan = plan_round(len(data), distill)
    assert (plan.steps, plan.sample_rate) == (92, 1 / 92)
    result = distill_locally(StudentMLP((1, 8, 8), 10, [4]), data, distill=distill, privacy=small_config.privacy,
                             noise_multiplier=1.0, plan=plan, seed=0)
    assert result.steps == 92


def test_dp_noise_is_not_reproducible_from_the_config_seed(small_config):
    # A known seed would let anyone regenerate the noise; non-DP runs stay reproducible.
    # One batch of all 96 records (sample rate 1) makes Poisson sampling deterministic, so
    # any difference between two runs with one seed is the noise.
    full = dataclasses.replace(small_config, distill=dataclasses.replace(small_config.distill, batch_size=96))
    a, _, plan = _train(full, privacy=small_config.privacy, noise=1.0, seed=5)
    assert plan.sample_rate == 1.0
    b, _, _ = _train(full, privacy=small_config.privacy, noise=1.0, seed=5)
    assert not torch.allclose(a.net[1].weight, b.net[1].weight)
    off = dataclasses.replace(small_config.privacy, enabled=False)
    c, _, _ = _train(small_config, privacy=off, seed=5)
    d, _, _ = _train(small_config, privacy=off, seed=5)
    assert torch.equal(c.net[1].weight, d.net[1].weight)


def test_more_noise_moves_the_weights_further_at_the_same_clipping(small_config):
    start = StudentMLP((1, 8, 8), 10, [16])
    torch.manual_seed(123)
    start = StudentMLP((1, 8, 8), 10, [16]).net[1].weight.detach().clone()
    quiet, _, _ = _train(small_config, privacy=small_config.privacy, noise=0.01)
    loud, _, _ = _train(small_config, privacy=small_config.privacy, noise=50.0)
    assert (loud.net[1].weight - start).norm() > 10 * (quiet.net[1].weight - start).norm()


def test_dp_without_a_calibrated_noise_is_refused(small_config):
    with pytest.raises(ValueError, match="no noise multiplier"):
        _train(small_config, privacy=small_config.privacy, noise=None)
