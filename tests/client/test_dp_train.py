import dataclasses

import pytest
import torch
from torch.utils.data import TensorDataset

from client.dp_train import distill_locally
from common.step_plan import plan_round
from common.losses import DistillationObjective
from common.models.image import StudentMLP


def _data(n=96):
    torch.manual_seed(0)
    x = torch.rand(n, 1, 8, 8)
    y = torch.randint(0, 10, (n,))
    return TensorDataset(x, y, torch.randn(n, 10))


def _explicit(small_config):
    """The run's distillation settings with an explicit step plan (sample rate 0.1, 3 epochs, normaliser
    64, lr 0.25), so that these tests do not depend on the DP-aware rule (tests/common/test_step_plan.py)."""
    return dataclasses.replace(small_config.distill, sample_rate=0.1, local_epochs=3, batch_size=64, lr=0.25)


def _train(small_config, *, privacy=None, noise=None, seed=0, data=None, distill=None, objective=None,
           generator="seeded"):
    """One round on `data`; the batches and noise come from a generator seeded here (so no test passes by
    luck), or with generator=None from the one the site uses."""
    data = data or _data()
    distill = distill or _explicit(small_config)
    torch.manual_seed(123)
    student = StudentMLP((1, 8, 8), 10, [16])
    plan = plan_round(distill, small_config.privacy, 100)
    result = distill_locally(student, data, objective=objective or DistillationObjective(distill), distill=distill,
                             privacy=privacy or small_config.privacy, noise_multiplier=noise, plan=plan, seed=seed,
                             generator=torch.Generator().manual_seed(7) if generator == "seeded" else generator)
    return student, result, plan


def _start():
    torch.manual_seed(123)
    return StudentMLP((1, 8, 8), 10, [16]).net[1].weight.detach().clone()


def test_the_plan_depends_on_the_configuration_only(small_config):
    distill = dataclasses.replace(_explicit(small_config), sample_rate=0.25, local_epochs=2, batch_size=32)
    plan = plan_round(distill, small_config.privacy, 100)
    assert (plan.sample_rate, plan.steps, plan.expected_batch_size) == (0.25, 8, 32)


@pytest.mark.parametrize("records", [8, 93, 185, 1000])
def test_dp_and_non_dp_training_take_the_planned_steps_whatever_the_record_count(small_config, records):
    data = TensorDataset(torch.rand(records, 1, 8, 8), torch.randint(0, 10, (records,)), torch.randn(records, 10))
    off = dataclasses.replace(small_config.privacy, enabled=False)
    for privacy, noise in ((small_config.privacy, 1.0), (off, None)):
        _, result, plan = _train(small_config, privacy=privacy, noise=noise, data=data)
        assert result.steps == plan.steps


def test_dp_training_keeps_clean_keys_and_leaves_no_hooks(small_config):
    student, _, _ = _train(small_config, noise=1.0)
    assert set(student.state_dict()) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    assert getattr(student.net[1].weight, "grad_sample", None) is None
    assert not student.net[1]._forward_hooks


def test_dp_noise_is_not_reproducible_from_the_config_seed(small_config):
    # A known seed would let anyone regenerate the noise; non-DP runs stay reproducible.
    # Sample rate 1 makes Poisson sampling deterministic, so any difference between two
    # runs with one seed is the noise.
    full = dataclasses.replace(_explicit(small_config), sample_rate=1.0)
    a, _, _ = _train(small_config, noise=1.0, seed=5, distill=full, generator=None)
    b, _, _ = _train(small_config, noise=1.0, seed=5, distill=full, generator=None)
    assert not torch.allclose(a.net[1].weight, b.net[1].weight)
    off = dataclasses.replace(small_config.privacy, enabled=False)
    c, _, _ = _train(small_config, privacy=off, seed=5, generator=None)
    d, _, _ = _train(small_config, privacy=off, seed=5, generator=None)
    assert torch.equal(c.net[1].weight, d.net[1].weight)


class CountingObjective(DistillationObjective):
    """The KD objective, counting the records each step's batch holds."""

    def __init__(self, distill):
        super().__init__(distill)
        self.records = 0

    def forward(self, student, inputs, labels, targets):
        self.records += len(labels)
        return super().forward(student, inputs, labels, targets)


@pytest.mark.parametrize("private", [True, False])
def test_batches_are_drawn_at_the_sample_rate_the_accountant_charges(small_config, private):
    """The accountant charges each step at the plan's sample rate (checked inside against its history);
    the records the steps actually see must be that rate's Poisson draws: a sampler at 4x the rate
    is far outside (sample rate 0.1, 1,000 records, 30 steps: 3,000 expected, 55 standard deviation)."""
    records = 1000
    data = TensorDataset(torch.rand(records, 1, 8, 8), torch.randint(0, 10, (records,)), torch.randn(records, 10))
    distill = dataclasses.replace(_explicit(small_config), sample_rate=0.1, local_epochs=3)
    counting = CountingObjective(distill)
    privacy = small_config.privacy if private else dataclasses.replace(small_config.privacy, enabled=False)
    _, result, plan = _train(small_config, privacy=privacy, noise=1.0 if private else None, data=data,
                             distill=distill, objective=counting)
    expected = plan.sample_rate * records * result.steps
    assert result.steps == 30 and abs(counting.records - expected) < 0.1 * expected, counting.records


def test_more_noise_moves_the_weights_further_at_the_same_clipping(small_config):
    start = _start()
    quiet, _, _ = _train(small_config, noise=0.01)
    loud, _, _ = _train(small_config, noise=50.0)
    assert (loud.net[1].weight - start).norm() > 10 * (quiet.net[1].weight - start).norm()


def test_per_sample_gradients_are_clipped(small_config):
    """With almost no noise and a tiny clipping norm C, each step moves the weights by at most
    lr * C * (batch size / expected batch size): unclipped, the first steps alone move them further."""
    tiny = dataclasses.replace(small_config.privacy, max_grad_norm=1e-4)
    distill = dataclasses.replace(_explicit(small_config), sample_rate=1.0, local_epochs=5, momentum=0.0)
    records = len(_data())
    clipped, result, plan = _train(small_config, privacy=tiny, noise=1e-6, distill=distill)
    bound = result.steps * distill.lr * 1e-4 * records / plan.expected_batch_size
    assert (clipped.net[1].weight - _start()).norm() <= bound * 1.01
    free, _, _ = _train(small_config, privacy=dataclasses.replace(small_config.privacy, enabled=False), distill=distill)
    assert (free.net[1].weight - _start()).norm() > 100 * bound


def test_dp_without_a_calibrated_noise_is_refused(small_config):
    with pytest.raises(ValueError, match="no noise multiplier"):
        _train(small_config, noise=None)


@pytest.mark.parametrize("private", [True, False])
def test_physical_chunks_give_the_whole_batch_step(small_config, private):
    """Chunks of 7 records (BatchMemoryManager's scheme): the same update as one pass over the
    batch, and with DP one accounted, noised step per logical batch (noise 0 here to compare)."""
    full = dataclasses.replace(_explicit(small_config), sample_rate=1.0, local_epochs=2)
    chunked = dataclasses.replace(full, max_physical_batch=7)
    privacy = small_config.privacy if private else dataclasses.replace(small_config.privacy, enabled=False)
    noise = 0.0 if private else None
    whole, result, plan = _train(small_config, privacy=privacy, noise=noise, distill=full)
    parts, chunked_result, _ = _train(small_config, privacy=privacy, noise=noise, distill=chunked)
    assert chunked_result.steps == result.steps == plan.steps  # the accountant's check passed inside
    assert torch.allclose(whole.net[1].weight, parts.net[1].weight, atol=1e-6)
    assert not torch.allclose(whole.net[1].weight, _start())


def test_an_empty_poisson_batch_is_a_noised_step(small_config):
    """A sample rate so small that every batch is empty: each step still adds noise and is accounted."""
    distill = _explicit(small_config)
    plan = dataclasses.replace(plan_round(distill, small_config.privacy, 100), sample_rate=1e-9, steps=3)
    torch.manual_seed(123)
    student = StudentMLP((1, 8, 8), 10, [16])
    result = distill_locally(student, _data(), objective=DistillationObjective(distill), distill=distill,
                             privacy=small_config.privacy, noise_multiplier=1.0, plan=plan, seed=0,
                             generator=torch.Generator().manual_seed(7))
    assert result.steps == 3 and result.loss == 0.0  # nothing seen, three accounted steps (checked inside)
    assert not torch.allclose(student.net[1].weight, _start())
