import numpy as np
import pytest

from common.partition import dirichlet_partition

LABELS = np.repeat(np.arange(10), 60)


def test_every_sample_lands_in_exactly_one_site():
    parts = dirichlet_partition(LABELS, num_sites=5, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))


def test_partition_is_seeded():
    a = dirichlet_partition(LABELS, num_sites=4, alpha=1.0, seed=7)
    b = dirichlet_partition(LABELS, num_sites=4, alpha=1.0, seed=7)
    c = dirichlet_partition(LABELS, num_sites=4, alpha=1.0, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def _mean_label_entropy(parts):
    entropies = []
    for p in parts:
        counts = np.bincount(LABELS[p], minlength=10) / len(p)
        nz = counts[counts > 0]
        entropies.append(-(nz * np.log(nz)).sum())
    return float(np.mean(entropies))


def test_smaller_alpha_gives_more_label_skew():
    skewed = _mean_label_entropy(dirichlet_partition(LABELS, num_sites=5, alpha=0.1, seed=0))
    even = _mean_label_entropy(dirichlet_partition(LABELS, num_sites=5, alpha=100.0, seed=0))
    assert skewed < even - 0.5
    assert even > np.log(10) - 0.1  # near-uniform labels at every site


def test_every_site_gets_a_minimum_and_impossible_requests_are_refused():
    parts = dirichlet_partition(LABELS, num_sites=10, alpha=0.3, seed=1, min_per_site=8)
    assert min(len(p) for p in parts) >= 8
    with pytest.raises(ValueError, match="fewer sites"):
        dirichlet_partition(LABELS[:20], num_sites=5, alpha=1.0, seed=0, min_per_site=8)


def test_a_runs_partition_is_computed_once_for_all_its_sites(monkeypatch):
    import torch
    from torch.utils.data import TensorDataset

    from common import partition

    calls = []
    real = partition.dirichlet_partition
    monkeypatch.setattr(partition, "dirichlet_partition", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(partition, "_partitions", {})
    private = TensorDataset(torch.arange(len(LABELS)), torch.from_numpy(LABELS))
    shares = [partition.site_share(private, site, 5, alpha=0.5, seed=3) for site in range(5)]
    assert len(calls) == 1
    expected = dirichlet_partition(LABELS, num_sites=5, alpha=0.5, seed=3)
    assert all(torch.equal(share.tensors[0], torch.from_numpy(part)) for share, part in zip(shares, expected))
    partition.site_share(private, 0, 5, alpha=0.5, seed=4)  # another seed is another partition
    assert len(calls) == 2
