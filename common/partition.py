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


def partition_description(config: TaskConfig, seed: int, num_sites: int) -> str:
    """What a ledger keys a simulated site's share on, beside the data set: the whole cut."""
    split = config.split
    return (f"seed {seed}, split teacher {split.teacher} / public {split.public} / test {split.test}, "
            f"{num_sites} sites, dirichlet_alpha {config.dirichlet_alpha}")


def site_share(private: TensorDataset, site: int, num_sites: int, *, alpha: float, seed: int) -> TensorDataset:
    """Site `site`'s records of the private part, label-skewed by Dirichlet(alpha)."""
    if not 0 <= site < num_sites:
        raise ValueError(f"site must be in [0, {num_sites}), got {site}")
    inputs, labels = private.tensors
    idx = torch.from_numpy(run_partition(labels.numpy(), num_sites=num_sites, alpha=alpha, seed=seed)[site])
    return TensorDataset(inputs[idx], labels[idx])


_partitions: dict[tuple, list[np.ndarray]] = {}


def run_partition(labels: np.ndarray, *, num_sites: int, alpha: float, seed: int) -> list[np.ndarray]:
    """`dirichlet_partition`, computed once per process for a run's labels and settings: a
    simulation worker plays many sites of one run, each of which needs only its own shard."""
    key = (hashlib.sha256(labels.tobytes()).hexdigest(), str(labels.dtype), num_sites, alpha, seed)
    if key not in _partitions:
        if len(_partitions) >= 4:
            _partitions.pop(next(iter(_partitions)))
        _partitions[key] = dirichlet_partition(labels, num_sites=num_sites, alpha=alpha, seed=seed)
    return _partitions[key]


def dirichlet_partition(
    labels: np.ndarray, *, num_sites: int, alpha: float, seed: int, min_per_site: int = 8, max_tries: int = 100
) -> list[np.ndarray]:
    """Split sample indices among `num_sites` with per-class shares drawn from Dirichlet(alpha).

    Every index lands in exactly one site. Draws are repeated (seeded) until every site has at
    least `min_per_site` samples; smaller alpha means stronger label skew.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if len(labels) < num_sites * min_per_site:
        raise ValueError(
            f"{len(labels)} private samples cannot give {num_sites} sites {min_per_site} samples "
            "each: use fewer sites or a larger private split"
        )
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_site:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a site with fewer than {min_per_site} samples in "
        f"{max_tries} draws: raise task.dirichlet_alpha or use fewer sites"
    )
