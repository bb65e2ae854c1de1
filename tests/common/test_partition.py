import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from common import partition
from common.partition import dirichlet_partition

LABELS = np.repeat(np.arange(10), 60)


def test_every_sample_lands_in_exactly_one_site():
    parts = dirichlet_partition(LABELS, num_parts=5, alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))


def test_partition_is_seeded():
    a = dirichlet_partition(LABELS, num_parts=4, alpha=1.0, seed=7)
    b = dirichlet_partition(LABELS, num_parts=4, alpha=1.0, seed=7)
    c = dirichlet_partition(LABELS, num_parts=4, alpha=1.0, seed=8)
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
    skewed = _mean_label_entropy(dirichlet_partition(LABELS, num_parts=5, alpha=0.1, seed=0))
    even = _mean_label_entropy(dirichlet_partition(LABELS, num_parts=5, alpha=100.0, seed=0))
    assert skewed < even - 0.5
    assert even > np.log(10) - 0.1  # near-uniform labels at every site


@pytest.mark.parametrize("num_parts, alpha", [(10, 0.3), (75, 0.01), (75, 1000.0)])
def test_every_part_gets_the_minimum_by_construction_at_any_alpha(num_parts, alpha):
    # 600 records, 75 parts of at least 8: every record is needed for the minimum; the old
    # redraw-until-it-holds partition refused 75 parts even at alpha=1000.
    parts = dirichlet_partition(LABELS, num_parts=num_parts, alpha=alpha, seed=1, min_per_part=8)
    assert min(len(p) for p in parts) >= 8
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_too_few_records_are_refused_with_the_number_of_sites_per_record_that_would_do():
    private = _private(LABELS[:200])
    with pytest.raises(ValueError, match=r"200 private records cannot give 30 shards .* task.sites_per_record=2 or more"):
        partition.site_share(private, 0, 30, alpha=1.0, seed=0)
    assert len(partition.site_share(private, 29, 30, alpha=1.0, seed=0, sites_per_record=2)) >= 8


def test_sites_per_record_k_gives_each_shard_to_k_sites_and_no_record_to_more():
    private = _private(LABELS)
    shares = [partition.site_share(private, site, 1000, alpha=0.5, seed=2, sites_per_record=14)
              for site in range(1000)]
    holders = np.bincount(torch.cat([share.tensors[0] for share in shares]).numpy(), minlength=len(LABELS))
    assert holders.max() == 14 and holders.min() >= 1  # 72 shards, each at 13 or 14 of the 1,000 sites
    assert min(len(share) for share in shares) >= 8
    assert torch.equal(shares[0].tensors[0], shares[72].tensors[0])
    assert not torch.equal(shares[0].tensors[0], shares[1].tensors[0])


def test_the_ledgers_partition_identity_names_the_scheme_and_the_sharing():
    from common.task_config import SplitConfig, TaskConfig

    config = TaskConfig(name="t", source="digits", kind="image", split=SplitConfig(), sites_per_record=3)
    described = partition.partition_description(config, seed=0, num_sites=100)
    assert partition.PARTITION_SCHEME in described and "sites_per_record 3" in described


def _private(labels):
    return TensorDataset(torch.arange(len(labels)), torch.from_numpy(labels))


def test_a_runs_partition_is_computed_once_for_all_its_sites(monkeypatch):
    calls = []
    real = partition.dirichlet_partition
    monkeypatch.setattr(partition, "dirichlet_partition", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(partition, "_partitions", {})
    private = _private(LABELS)
    shares = [partition.site_share(private, site, 5, alpha=0.5, seed=3) for site in range(5)]
    assert len(calls) == 1
    expected = dirichlet_partition(LABELS, num_parts=5, alpha=0.5, seed=3)
    assert all(torch.equal(share.tensors[0], torch.from_numpy(part)) for share, part in zip(shares, expected))
    partition.site_share(private, 0, 5, alpha=0.5, seed=4)  # another seed is another partition
    assert len(calls) == 2
