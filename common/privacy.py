"""The site privacy ledger: every release a site makes from its records, kept on the site's disk.

The ledger outlives rounds, runs and process restarts (Flower's `context.state` lives only
for one run, in memory, so it cannot be the ledger). It owns the site's privacy state:
how much epsilon is spent, the noise a round needs to stay within the budget, and the
atomic reservation of a round's steps before they are taken. A round without DP is
recorded too, as an unbounded release, after which the ledger refuses every DP claim.
Calibration and checks use one accountant (Opacus's RDP, add/remove-one adjacency), so
what is calibrated is what is checked.

A ledger covers one set of records: it keeps their fingerprint and refuses other records,
and a new ledger refuses records cut from a data set that its sibling ledgers hold under
another partition (the same record would otherwise be charged in two ledgers).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

from torch.utils.data import TensorDataset

from common.accounting import epsilon_of, least_noise
from common.storage import atomic_write, private_folder

LEDGER_FILE = "ledger.json"
LEDGER_FORMAT = "fedistill-privacy-ledger"
LEDGER_VERSION = 2
ACCOUNTANT = "rdp"


class LedgerError(RuntimeError):
    """The ledger cannot be trusted or does not cover these records (unreadable, corrupt, other terms)."""


class BudgetExhausted(RuntimeError):
    """The site's remaining budget cannot cover the requested DP steps."""


class RoundAlreadyTrained(RuntimeError):
    """The run already trained this round here: a replayed request."""


class RoundLimit(RuntimeError):
    """The run already trained as many rounds here as it and the site's policy allow."""


@dataclass(frozen=True)
class Budget:
    """An (epsilon, delta) limit on the site's total privacy loss."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class DataFingerprint:
    """Which records a ledger covers."""

    dataset: str    # the data set the records were cut from
    partition: str  # how that data set was cut into sites ("whole" for a site's own file)
    records: str    # SHA-256 of the records themselves
    # How many ledgers may charge these very records: k > 1 only for a simulated partition whose
    # records are each held by k sites (task.sites_per_record), every one with its own ledger.
    copies: int = 1


def records_digest(data: TensorDataset) -> str:
    """SHA-256 of a site's records (every tensor of the data set, in order)."""
    sha = hashlib.sha256()
    for tensor in data.tensors:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def file_records(data: TensorDataset) -> DataFingerprint:
    """The fingerprint of a site's own records (its policy's data_path), kept whole."""
    records = records_digest(data)
    return DataFingerprint(dataset=f"file {records[:16]}", partition="whole", records=records)


@dataclass(frozen=True)
class LedgerEntry:
    """A block of steps with one noise multiplier and one sample rate; `dp=False`: a release without DP."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    run: str
    round: int
    time: float
    dp: bool = True
    released: float | None = None  # the value a one-off Gaussian release published (a noisy record count)

    @classmethod
    def from_json(cls, value: object) -> LedgerEntry:
        """An entry as a ledger file holds it, every field of exactly its type; ValueError otherwise
        (a string or a boolean where a count belongs would be counted wrongly, or not at all)."""
        names = {f.name for f in fields(cls)}
        if not isinstance(value, dict) or not set(value) <= names or not names - {"dp", "released"} <= set(value):
            raise ValueError(f"an entry must be an object with the keys {sorted(names)}")
        for key, item in value.items():
            if type(item) not in ENTRY_TYPES[key]:
                raise ValueError(f"an entry's {key} must be {' or '.join(t.__name__ for t in ENTRY_TYPES[key])}, "
                                 f"got {type(item).__name__}")
        return cls(**value)

    @property
    def accountant_step(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def is_possible(self) -> bool:
        if not self.dp:
            return self.steps >= 0
        return self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier) and 0 < self.sample_rate <= 1 and self.steps > 0


ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "noise_multiplier": (float, int), "sample_rate": (float, int), "steps": (int,), "run": (str,), "round": (int,),
    "time": (float, int), "dp": (bool,), "released": (float, int, type(None)),
}


class PrivacyLedger:
    """The privacy ledger in `directory` for the records `data`, under the site's total `budget`.

    A ledger kept under another budget, delta or accountant, or for other records, is
    refused: composing across them would silently change the guarantee. `limit` arguments
    are a run's own request; every check holds both the request and the site's budget.
    """

    def __init__(self, directory: Path | str, *, budget: Budget, data: DataFingerprint):
        self.directory = Path(directory)
        self.path = self.directory / LEDGER_FILE
        self.budget = budget
        self.data = data
        private_folder(self.directory)
        self.entries = self._read()
        if not self.path.exists():
            self._refuse_overlapping_partition()  # early, before any calibration; _append checks again

    @classmethod
    def inspect(cls, directory: Path | str, *, budget: Budget) -> "PrivacyLedger":
        """The ledger kept in `directory`, opened for reading with the records it was kept for
        (monitoring and the site check, which do not load the site's data); LedgerError if it
        is missing, unreadable or fails its checks."""
        path = Path(directory) / LEDGER_FILE
        try:
            data = DataFingerprint(**json.loads(path.read_text())["data"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(f"privacy ledger {path} is missing, unreadable or corrupt ({err}); restore it from "
                              "the site's backup: a new ledger would start at epsilon 0") from None
        return cls(directory, budget=budget, data=data)

    # -- queries ----------------------------------------------------------------------

    @property
    def released_without_dp(self) -> LedgerEntry | None:
        return next((e for e in self.entries if not e.dp), None)

    def rounds_of(self, run: str) -> set[int]:
        """The rounds of `run` this ledger recorded a training release for."""
        return {e.round for e in self.entries if e.run == run and e.released is None}

    def epsilon_of_run(self, run: str, delta: float) -> float:
        """Epsilon of `run`'s own releases at `delta` (what a reply reports: the site's spend in
        other runs is none of that run's business); infinite if the run released without DP."""
        mine = [e for e in self.entries if e.run == run]
        if any(not e.dp for e in mine):
            return math.inf
        return epsilon_of([e.accountant_step for e in mine], delta=delta)

    def epsilon_spent(self, delta: float | None = None) -> float:
        """Epsilon spent at `delta` (the site's by default); infinite after a release without DP."""
        if self.released_without_dp is not None:
            return math.inf
        return epsilon_of([e.accountant_step for e in self.entries], delta=delta or self.budget.delta)

    def _epsilons_after(self, noise_multiplier: float, sample_rate: float, steps: int, limits: list[Budget]) -> list[float]:
        blocks = [e.accountant_step for e in self.entries] + [(noise_multiplier, sample_rate, steps)]
        return [epsilon_of(blocks, delta=b.delta) for b in limits]

    def _within(self, noise_multiplier: float, sample_rate: float, steps: int, limits: list[Budget]) -> bool:
        after = self._epsilons_after(noise_multiplier, sample_rate, steps, limits)
        return all(eps <= b.epsilon for eps, b in zip(after, limits))

    def calibrate(
        self, *, limit: Budget, sample_rate: float, steps: int, max_noise_multiplier: float, tolerance: float = 1e-4
    ) -> float:
        """The smallest noise multiplier (to `tolerance`) with which `steps` more steps stay within
        both `limit` and the site's budget.

        Raises BudgetExhausted when even `max_noise_multiplier` would exceed them.
        """
        if steps <= 0:
            raise ValueError(f"steps must be > 0, got {steps}")
        limits = [self.budget, limit]
        self._refuse_without_guarantee()
        spent = self.epsilon_spent(limit.delta)
        if spent >= limit.epsilon:
            raise BudgetExhausted(f"epsilon spent {spent:.4g} has reached the limit {limit.epsilon:.4g}")
        if not self._within(max_noise_multiplier, sample_rate, steps, limits):
            raise BudgetExhausted(
                f"epsilon spent {self.epsilon_spent():.4g} of budget {self.budget.epsilon:.4g} (this run's limit "
                f"{limit.epsilon:.4g}): {steps} more steps at sample rate {sample_rate:.4g} would exceed it even "
                f"with noise multiplier {max_noise_multiplier} (privacy.max_noise_multiplier)"
            )
        return least_noise(lambda sigma: self._within(sigma, sample_rate, steps, limits), max_noise_multiplier,
                           tolerance=tolerance)

    # -- the mutations ----------------------------------------------------------------

    def admit_round(
        self, *, run: str, round: int, most_rounds: int, sample_rate: float, steps: int,
        limit: Budget | None, planned_steps: int = 0, max_noise_multiplier: float = 0.0,
    ) -> float | None:
        """Admit round `round` of `run` and record its release before it happens, all under one lock,
        so that concurrent requests cannot both pass a check before either writes.

        Refuses a round this run already trained (RoundAlreadyTrained) and one beyond
        `most_rounds` rounds of the run (RoundLimit). With DP (`limit` set) the noise multiplier
        is calibrated so that `planned_steps` steps (this round's and those of the rounds the
        site has left) stay within `limit` and the budget, and this round's `steps` are
        reserved with it (BudgetExhausted if impossible); without DP (`limit` None) the round is
        recorded as a release without DP. Returns the noise multiplier (None without DP).
        """
        with self._locked():  # the checks and the write under one lock
            self.entries = self._read()
            trained = self.rounds_of(run)
            if round in trained:
                raise RoundAlreadyTrained(f"round {round} of this run was already trained")
            if len(trained) >= most_rounds:
                raise RoundLimit(f"this run already trained {len(trained)} rounds, its limit (rounds, site.max_rounds)")
            if limit is None:
                self._append(LedgerEntry(0.0, sample_rate, steps, run, round, time.time(), dp=False))
                return None
            noise = self.calibrate(limit=limit, sample_rate=sample_rate, steps=planned_steps,
                                   max_noise_multiplier=max_noise_multiplier)
            self._reserve(limit, noise, sample_rate, steps, run, round)
        return noise

    def reserve(
        self, *, limit: Budget, noise_multiplier: float, sample_rate: float, steps: int, run: str, round: int
    ) -> float:
        """Record `steps` DP steps before they are taken, refusing if they would exceed `limit` or the budget.

        The ledger is re-read under an exclusive lock so that concurrent processes on one
        site cannot both spend the same remaining budget. Returns epsilon spent afterwards.
        """
        with self._locked():
            self.entries = self._read()
            return self._reserve(limit, noise_multiplier, sample_rate, steps, run, round)

    def _reserve(self, limit: Budget, noise_multiplier: float, sample_rate: float, steps: int, run: str,
                 round: int) -> float:
        """`reserve` with the lock held and the entries fresh."""
        self._refuse_without_guarantee()
        after = self._refuse_beyond([self.budget, limit], noise_multiplier, sample_rate, steps,
                                    f"{steps} steps at noise multiplier {noise_multiplier:.4g}")
        self._append(LedgerEntry(noise_multiplier, sample_rate, steps, run, round, time.time()))
        return after

    def release_noisy_count(self, *, limit: Budget, count: int, noise: float, run: str, round: int) -> float:
        """`count` plus Gaussian noise of standard deviation `noise`, recorded before it leaves the site.

        Adding or removing one record changes the count by 1, so this is the Gaussian
        mechanism with noise multiplier `noise` at sample rate 1 for one step, and the
        ledger charges it as such. It is released once per set of records: later calls with
        the same `noise` return the recorded value, which costs nothing more (post-processing).
        """
        with self._locked():
            self.entries = self._read()
            done = [e.released for e in self.entries if e.released is not None and e.noise_multiplier == noise]
            if done:
                return done[0]
            if self.released_without_dp is None:  # with no guarantee left there is no limit to keep
                self._refuse_beyond([self.budget, limit], noise, 1.0, 1, f"releasing a noisy record count (noise {noise:g})")
            value = count + random.SystemRandom().gauss(0.0, noise)  # the operating system's entropy
            self._append(LedgerEntry(noise, 1.0, 1, run, round, time.time(), released=value))
        return value

    def _append(self, entry: LedgerEntry) -> None:
        """Write `entry`; the caller holds the lock. A first entry re-checks the sibling ledgers,
        under the same lock, so two new ledgers cannot both pass that check."""
        if not entry.is_possible():
            raise LedgerError(f"refusing to record an impossible entry {entry}")
        if not self.path.exists():
            self._refuse_overlapping_partition()
        self._write(self.entries + [entry])
        self.entries.append(entry)

    def _refuse_beyond(self, limits: list[Budget], noise_multiplier: float, sample_rate: float, steps: int,
                       what: str) -> float:
        """Epsilon (at the site's delta) after `what`; BudgetExhausted if it would exceed any of `limits`."""
        after = self._epsilons_after(noise_multiplier, sample_rate, steps, limits)
        if any(eps > b.epsilon for eps, b in zip(after, limits)):
            raise BudgetExhausted(f"{what} would bring epsilon to {max(after):.4g}, over the limit "
                                  f"{min(b.epsilon for b in limits):.4g}")
        return after[0]

    def _refuse_without_guarantee(self) -> None:
        release = self.released_without_dp
        if release is not None:
            raise BudgetExhausted(
                f"these records were released without DP (run {release.run}, round {release.round}); "
                "no DP guarantee can be claimed for them any more"
            )

    # -- storage ----------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One lock for every ledger in the folder: writes are rare, and a new ledger's check of
        its siblings must not race another new ledger."""
        fd = os.open(self.directory.parent / ".ledgers.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        fix = f"move {self.path} aside only if you know what it recorded; a new ledger starts at epsilon 0"
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("format") != LEDGER_FORMAT or doc.get("version") != LEDGER_VERSION:
                raise LedgerError(f"{self.path} is not a version-{LEDGER_VERSION} fedistill privacy ledger; {fix}")
            if doc.get("accountant") != ACCOUNTANT or doc.get("delta") != self.budget.delta:
                raise LedgerError(
                    f"{self.path} was kept with accountant {doc.get('accountant')!r} and delta {doc.get('delta')}, "
                    f"but the site's policy says {ACCOUNTANT!r} and delta {self.budget.delta}: set site.delta="
                    f"{doc.get('delta')} or give the site its own site.ledger_dir"
                )
            if doc.get("budget") != self.budget.epsilon:
                raise LedgerError(
                    f"{self.path} is kept for a total budget of epsilon {doc.get('budget')}, but the site's policy "
                    f"says {self.budget.epsilon:g}: a budget cannot be changed once spending has started; set "
                    f"site.epsilon={doc.get('budget')}"
                )
            recorded = DataFingerprint(**doc["data"])
            if type(recorded.copies) is not int or recorded.copies < 1:
                raise ValueError(f"data.copies must be an integer >= 1, got {recorded.copies!r}")
            entries = [LedgerEntry.from_json(e) for e in doc["entries"]]
        except LedgerError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"privacy ledger {self.path} is unreadable or corrupt ({err}); {fix}") from None
        if recorded != self.data:
            raise LedgerError(
                f"{self.path} covers other records than this site's (its data fingerprint differs: "
                f"{_difference(recorded, self.data)}); a ledger belongs to one set of records. Use the records "
                "and partition this ledger was kept for, or a ledger folder of its own for these records only "
                "if they share nothing with the ones charged here"
            )
        for e in entries:
            if not e.is_possible():
                raise LedgerError(f"privacy ledger {self.path} holds an impossible entry {e}; {fix}")
        return entries

    def _refuse_overlapping_partition(self) -> None:
        """A new ledger beside one for the same records, or for the same data set cut another way,
        would charge records twice; records declared held by k sites may have k ledgers, no more."""
        holders = 0
        for other in sorted(self.directory.parent.glob(f"*/{LEDGER_FILE}")):
            if other == self.path:
                continue
            try:
                theirs = DataFingerprint(**json.loads(other.read_text())["data"])
            except (OSError, ValueError, KeyError, TypeError):
                raise LedgerError(f"privacy ledger {other} beside this site's is unreadable or corrupt; a new "
                                  f"ledger in {self.directory.parent} cannot be checked against it") from None
            if theirs.records == self.data.records:
                holders += 1
                if theirs != self.data or holders >= self.data.copies:
                    raise LedgerError(f"{other} already charges these very records: a second ledger for them would "
                                      "let them be charged twice; use that ledger")
            if theirs.dataset == self.data.dataset and theirs.partition != self.data.partition:
                raise LedgerError(
                    f"{other} charges records of the same data set under another partition ({theirs.partition}; "
                    f"this site's is {self.data.partition}): records charged there would be charged again here. "
                    "Keep the partition those ledgers were kept for (same sites, seed and split)"
                )

    def _write(self, entries: list[LedgerEntry]) -> None:
        doc = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "accountant": ACCOUNTANT,
            "delta": self.budget.delta,
            "budget": self.budget.epsilon,
            "data": asdict(self.data),
            "entries": [asdict(e) for e in entries],
        }
        atomic_write(self.path, json.dumps(doc, indent=1).encode(), durable=True, mode=0o600)


def _difference(recorded: DataFingerprint, current: DataFingerprint) -> str:
    """What differs, e.g. 'partition "... 3 sites ..." recorded, "... 4 sites ..." now'; hashes shortened."""
    def show(name: str, value: str) -> str:
        return value[:16] if name == "records" else value
    return "; ".join(f"{name} {show(name, getattr(recorded, name))!r} recorded, {show(name, getattr(current, name))!r} now"
                     for name in ("dataset", "partition", "records") if getattr(recorded, name) != getattr(current, name))
