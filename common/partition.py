"""Seeded splits of a labelled set: teacher / public / test / private, and the private part across sites."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.task_config import SplitConfig, TaskConfig

PARTS = ("teacher", "public", "test", "private")


def split_parts(n: int, split: SplitConfig, seed: int) -> dict[str, np.ndarray]:
    """Indices of each part of `n` records: seeded shuffle, then the configured fractions in order;
    the private part is what is left."""
    order = np.random.default_rng(seed).permutation(n)
    sizes = [int(round(f * n)) for f in (split.teacher, split.public, split.test)]
    return dict(zip(PARTS, np.split(order, np.cumsum(sizes))))


# Part of every simulated ledger's partition identity: a ledger kept under another cut of the
# records is refused. Raise it whenever the cut below changes.
PARTITION_SCHEME = "v2: 8 records per shard first, then Dirichlet label skew"
MIN_PER_SHARD = 8


def partition_description(config: TaskConfig, seed: int, num_sites: int) -> str:
    """What a ledger keys a simulated site's share on, beside the data set: the whole cut."""
    split = config.split
    return (f"partition {PARTITION_SCHEME}; seed {seed}, split teacher {split.teacher} / public {split.public} / "
            f"test {split.test}, {num_sites} sites, dirichlet_alpha {config.dirichlet_alpha}, "
            f"sites_per_record {config.sites_per_record}")


def num_shards(num_sites: int, sites_per_record: int) -> int:
    """How many disjoint shards the private part is cut into: each is held by `sites_per_record` sites."""
    return -(-num_sites // sites_per_record)


def site_share(private: TensorDataset, site: int, num_sites: int, *, alpha: float, seed: int,
               sites_per_record: int = 1) -> TensorDataset:
    """Site `site`'s records of the private part: shard `site mod shards` of a label-skewed cut.
    With `sites_per_record` k > 1, each shard (so each record) is held by k sites."""
    if not 0 <= site < num_sites:
        raise ValueError(f"site must be in [0, {num_sites}), got {site}")
    inputs, labels = private.tensors
    shards = num_shards(num_sites, sites_per_record)
    try:
        cut = run_partition(labels.numpy(), num_parts=shards, alpha=alpha, seed=seed)
    except TooFewRecords as err:
        raise ValueError(f"{err}: with sites={num_sites}, declare task.sites_per_record="
                         f"{sites_per_record_needed(err.records, num_sites)} or more (each record then held "
                         f"by that many simulated sites), or use fewer sites") from None
    idx = torch.from_numpy(cut[site % shards])
    return TensorDataset(inputs[idx], labels[idx])


def sites_per_record_needed(records: int, num_sites: int) -> int:
    """The fewest sites per record that give each of `num_sites` sites its minimum of `records`."""
    return next(k for k in range(1, num_sites + 1) if num_shards(num_sites, k) * MIN_PER_SHARD <= records)


_partitions: dict[tuple, list[np.ndarray]] = {}


def run_partition(labels: np.ndarray, *, num_parts: int, alpha: float, seed: int) -> list[np.ndarray]:
    """`dirichlet_partition`, computed once per process for a run's labels and settings: a
    simulation worker plays many sites of one run, each of which needs only its own shard."""
    key = (hashlib.sha256(labels.tobytes()).hexdigest(), str(labels.dtype), num_parts, alpha, seed)
    if key not in _partitions:
        if len(_partitions) >= 4:
            _partitions.pop(next(iter(_partitions)))
        _partitions[key] = dirichlet_partition(labels, num_parts=num_parts, alpha=alpha, seed=seed)
    return _partitions[key]


class TooFewRecords(ValueError):
    def __init__(self, records: int, num_parts: int, min_per_part: int):
        super().__init__(f"{records} private records cannot give {num_parts} shards {min_per_part} records each")
        self.records = records


def dirichlet_partition(labels: np.ndarray, *, num_parts: int, alpha: float, seed: int,
                        min_per_part: int = MIN_PER_SHARD) -> list[np.ndarray]:
    """Split sample indices into `num_parts` disjoint parts, each sorted: first `min_per_part`
    records to every part, drawn at random; then the rest class by class, in shares drawn from
    Dirichlet(alpha) (smaller alpha: stronger label skew).

    Every index lands in exactly one part, and the minimum holds by construction, at any alpha
    and any number of parts the records allow (flwr-datasets' DirichletPartitioner instead
    redraws until the minimum holds, which fails for many parts or small alpha).
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if len(labels) < num_parts * min_per_part:
        raise TooFewRecords(len(labels), num_parts, min_per_part)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    owner = np.empty(len(labels), dtype=np.int64)
    guaranteed = num_parts * min_per_part
    owner[order[:guaranteed]] = np.arange(guaranteed) % num_parts
    rest = order[guaranteed:]
    for cls in np.unique(labels):
        members = rest[labels[rest] == cls]
        shares = rng.dirichlet(np.full(num_parts, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        owner[members] = np.repeat(np.arange(num_parts), np.diff(cuts, prepend=0, append=len(members)))
    by_owner = np.argsort(owner, kind="stable")
    return np.split(by_owner, np.cumsum(np.bincount(owner, minlength=num_parts))[:-1])
