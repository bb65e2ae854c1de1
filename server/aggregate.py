"""Aggregation of the sites' arrays: coordinate-wise (weighted mean, median, trimmed mean) for both
exchanges, and for whole students Krum, Multi-Krum and Bulyan (Flower's selection rules) with the
server's clipping of each site's update norm."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.multikrum import select_multikrum

Student = dict[str, np.ndarray]  # a student's named arrays


def aggregate(stack: np.ndarray, weights: np.ndarray, *, method: str, trim_fraction: float = 0.2) -> np.ndarray:
    """stack [S, ...] from S sites, weights [S] -> [...].

    `mean` weights each site by `weights`; `median` and `trimmed_mean` treat sites equally
    and resist a few extreme sites.
    """
    stack = np.asarray(stack, dtype=np.float64)
    if method == "mean":
        w = np.asarray(weights, dtype=np.float64)
        return np.tensordot(w / w.sum(), stack, axes=1)
    if method == "median":
        return np.median(stack, axis=0)
    if method == "trimmed_mean":
        # Round up, so that a small federation still drops its extremes, but keep at least one site.
        sites = stack.shape[0]
        cut = min(int(np.ceil(trim_fraction * sites)), (sites - 1) // 2)
        ordered = np.sort(stack, axis=0)
        return ordered[cut : stack.shape[0] - cut].mean(axis=0)
    raise ValueError(f"unknown aggregation {method!r}: use mean, median or trimmed_mean")


class StudentAggregator:
    """Combines whole students: clips each site's update to `clip_norm` around the global student
    (None: no clipping), then either aggregates every array coordinate-wise (`mean`, `median`,
    `trimmed_mean`) or first selects students by Flower's Multi-Krum rule, assuming
    f = floor(assumed_hostile x replies) of them hostile: `krum` keeps the one closest to its
    n - f - 2 nearest others, `multikrum` averages the n - f closest, `bulyan` takes the n - 2f
    closest and then, per coordinate, averages the n - 4f values nearest their median."""

    def __init__(self, *, method: str, trim_fraction: float, assumed_hostile: float, clip_norm: float | None):
        self.method, self.trim_fraction = method, trim_fraction
        self.assumed_hostile, self.clip_norm = assumed_hostile, clip_norm

    def __call__(self, students: list[Student], weights: np.ndarray, start: Student) -> tuple[Student, dict]:
        """The combined student from `students` (weighted by `weights` where the method weighs),
        which started from `start`, and what was done (for the round's record)."""
        report: dict = {}
        if self.clip_norm is not None:
            students, report["clipped"] = self.clip(students, start)
        if self.method in ("krum", "multikrum", "bulyan"):
            chosen, report["hostile_assumed"] = self.select(students)
            report["selected"] = len(chosen)
            if self.method == "bulyan":
                return self.bulyan([students[i] for i in chosen], report["hostile_assumed"]), report
            students, weights = [students[i] for i in chosen], np.asarray(weights)[chosen]
            method = "mean"
        else:
            method = self.method
        combined = {name: aggregate(np.stack([s[name] for s in students]), weights, method=method,
                                    trim_fraction=self.trim_fraction) for name in start}
        return combined, report

    def clip(self, students: list[Student], start: Student) -> tuple[list[Student], int]:
        """Each student as `start` plus its update scaled to an L2 norm of at most `clip_norm`
        (over all floating-point arrays), and how many were scaled."""
        clipped, count = [], 0
        floats = [name for name, g in start.items() if np.issubdtype(g.dtype, np.floating)]
        for student in students:
            norm = math.sqrt(sum(float(np.sum((student[n].astype(np.float64) - start[n]) ** 2)) for n in floats))
            if norm <= self.clip_norm:
                clipped.append(student)
                continue
            count += 1
            scale = self.clip_norm / norm
            clipped.append({n: start[n] + scale * (a.astype(np.float64) - start[n]) if n in floats else a
                            for n, a in student.items()})
        return clipped, count

    def select(self, students: list[Student]) -> tuple[list[int], int]:
        """The indices of the students Flower's Multi-Krum rule keeps for this method, and f."""
        n = len(students)
        f = math.floor(self.assumed_hostile * n)
        keep = {"krum": 1, "multikrum": n - f, "bulyan": n - 2 * f}[self.method]
        if self.method == "bulyan" and n < 4 * f + 3:
            raise ValueError(f"bulyan needs at least 4f + 3 = {4 * f + 3} replies with f = {f} assumed hostile "
                             f"(exchange.assumed_hostile={self.assumed_hostile:g} of {n}): lower "
                             "exchange.assumed_hostile, or sample more sites each round")
        contents = [RecordDict({"student": ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in s.items()})})
                    for s in students]
        chosen = select_multikrum(contents, f, keep)
        return [next(i for i, c in enumerate(contents) if c is choice) for choice in chosen], f

    @staticmethod
    def bulyan(selected: list[Student], f: int) -> Student:
        names = list(selected[0])
        arrays = [[s[name].astype(np.float64) for name in names] for s in selected]
        median = [np.median(np.stack(layer), axis=0) for layer in zip(*arrays)]
        return dict(zip(names, aggregate_n_closest_weights(median, arrays, len(selected) - 2 * f)))
