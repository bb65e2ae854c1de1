"""The ClientApp: a site checks the run's request against its policy, distills under DP, replies.

Everything the site sends is listed in `common.payload.RELEASED_UNDER_DP` with the reason it
may leave; a refusal carries a code and a short reason, and details stay in the site's log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import sys
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import TensorDataset

from client.dp_train import StepPlan, distill_locally, plan_round
from common import payload as P
from common.config import CONF_DIR, Config, ConfigError, load_config
from common.monitoring import record_activity
from common.policy import SitePolicy, policy_from, site_policy
from common.privacy import (Budget, BudgetExhausted, DataFingerprint, LedgerError, PrivacyLedger, file_records,
                            records_digest)
from common.public_outputs import PublicOutputs
from common.tasks import Task, build_task

log = logging.getLogger(__name__)

app = ClientApp()

CONFIG_GROUPS = frozenset(p.name for p in CONF_DIR.iterdir() if p.is_dir())  # task, privacy, exchange, ...


class Refusal(Exception):
    """A round this site will not train: `code` and `reason` may leave the site, `detail` stays in its log."""

    def __init__(self, code: str, reason: str, detail: str = ""):
        super().__init__(reason)
        self.code, self.reason, self.detail = code, reason, detail or reason


@dataclass(frozen=True)
class Site:
    """One site: the run's request, the site's own policy, and its private data with the teacher's targets."""

    name: str
    config: Config        # the run's request, composed from the run config and checked against `policy`
    policy: SitePolicy
    task: Task
    index: int
    objective: nn.Module  # the task's local loss; reads the targets in `data` by its target_kinds
    data: TensorDataset   # (inputs, labels, *teacher targets)
    fingerprint: DataFingerprint

    @property
    def ledger_dir(self) -> Path:
        return self.policy.ledger_root / self.name

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.ledger_dir, budget=Budget(self.policy.epsilon, self.policy.delta), data=self.fingerprint)

    @cached_property
    def assets(self) -> dict[str, int | str]:
        """The teacher and public set this site holds, as the server announces its own."""
        return P.asset_manifest(self.task)

    @cached_property
    def outputs(self) -> PublicOutputs:
        """What this site's student says about the public inputs (exchange=logits)."""
        return self.task.public_outputs(self.config.exchange)

    def new_student(self) -> nn.Module:
        """This site's student: the global architecture, or its own with different students per site."""
        torch.manual_seed(self.config.seed * 1000 + self.index)
        return self.task.student(self.config.exchange.student_for(self.index, self.config.student))


def read_request(overrides: str, policy: SitePolicy) -> Config:
    """The run's configuration as this site will use it, or a Refusal.

    The request may not interpolate (`${...}` is resolved on the site's side, where it
    could read the site's environment) nor set Hydra's own keys (a search path would read
    the site's files), and must lie inside the policy. The site's cache
    folder is its policy's, never the request's; so is its teacher when the policy names one.
    """
    if "${" in overrides:
        raise Refusal(P.REFUSAL_BAD_REQUEST, "the run config uses interpolation (${...}), which sites do not resolve")
    try:
        tokens = [token.split("=", 1) for token in shlex.split(overrides)]
    except ValueError:
        raise Refusal(P.REFUSAL_BAD_REQUEST, "the run config's overrides are not a shell-quoted list") from None
    for key, *value in tokens:
        key = key.lstrip("+~")
        if key.startswith("hydra"):
            raise Refusal(P.REFUSAL_BAD_REQUEST, "the run config sets hydra.* keys (e.g. a config search path on "
                                                 "the site's disk), which sites do not accept")
        if key in CONFIG_GROUPS and not (value and re.fullmatch(r"[A-Za-z0-9_-]+", value[0])):
            raise Refusal(P.REFUSAL_BAD_REQUEST, f"the run config chooses {key}= by a path; sites accept only the "
                                                 f"names in conf/{key}/")
    try:
        request = load_config(overrides)
    except ConfigError as err:
        raise Refusal(P.REFUSAL_BAD_REQUEST, "the run config is not a valid fedistill configuration",
                      f"the run config is invalid: {err}") from None
    problems = policy.violations(request)
    if problems:
        raise Refusal(P.REFUSAL_POLICY, "; ".join(problems))
    if policy.teacher_path is not None:
        task = dataclasses.replace(request.task, teacher=dataclasses.replace(request.task.teacher, path=policy.teacher_path))
        request = dataclasses.replace(request, task=task)
    return dataclasses.replace(request, cache_dir=policy.cache_dir)


@lru_cache(maxsize=2)
def load_task(overrides: str, policy_key: str) -> tuple[Config, Task]:
    """The checked request and its task once per process, shared by every site this process plays."""
    config = read_request(overrides, policy_from(json.loads(policy_key)))
    return config, build_task(config)


def load_site(overrides: str, partition_id: int, num_partitions: int, policy: SitePolicy) -> Site:
    """The site this process plays for this request, built once per process.

    One simulation worker plays many sites in turn, so every site stays cached (a site
    holds only its own slice of the data).
    """
    return _load_site(overrides, partition_id, num_partitions, json.dumps(dataclasses.asdict(policy), sort_keys=True))


@lru_cache(maxsize=None)
def _load_site(overrides: str, partition_id: int, num_partitions: int, policy_key: str) -> Site:
    config, task = load_task(overrides, policy_key)
    policy = policy_from(json.loads(policy_key))
    if policy.data_path is not None:
        data = task.load_private(Path(policy.data_path).expanduser())
        fingerprint = file_records(data)
    else:  # the task's built-in data, split over the federation's SuperNodes (Flower's simulation)
        data = task.private_data(partition_id, num_partitions)
        dataset, partition = task.partition_identity(num_partitions)
        fingerprint = DataFingerprint(dataset=dataset, partition=partition, records=records_digest(data))
    inputs, labels = data.tensors
    objective = task.objective(config.distill)
    targets = task.teacher_targets(inputs, objective.target_kinds)  # once per site: halves a KD step's cost
    return Site(policy.name or site_name(partition_id), config, policy, task, partition_id, objective,
                TensorDataset(inputs, labels, *(targets[kind] for kind in objective.target_kinds)), fingerprint)


load_site.cache_clear = _load_site.cache_clear  # type: ignore[attr-defined]


def site_name(partition_id: int) -> str:
    return f"site-{partition_id}"


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=answer(msg.content, context), reply_to=msg)


def answer(content: RecordDict, context: Context) -> RecordDict:
    """This site's reply to a training request: a trained reply or a refusal, never an exception.

    An exception's text would reach the server in Flower's error reply, so errors are
    logged here and the server gets a code. Every outcome is added to the site's activity
    log (common.monitoring), which its metrics endpoint serves.
    """
    started = time.perf_counter()
    node = context.node_config
    partition_id = int(node.get("partition-id", 0))
    name = site_name(partition_id)
    policy = None
    try:
        policy = site_policy(node)
        name = policy.name or name
        site = load_site(str(context.run_config.get("overrides", "")), partition_id,
                         int(node.get("num-partitions", 1)), policy)
        server_round = int(content[P.CONFIG][P.SERVER_ROUND])
        reply = train_round(site, content, context.state, server_round=server_round, run=str(context.run_id))
    except Refusal as refused:
        reply = refusal(name, refused)
    except Exception:
        log.exception("%s: the round failed", name)
        reply = refusal(name, Refusal(P.REFUSAL_SITE_ERROR,
                                      "the site could not take part in this round (details in the site's log)"))
    if policy is not None:
        status = reply[P.CONFIG]
        record_activity(policy.ledger_root / name, run=str(context.run_id), server_round=round_number(content),
                        status=str(status[P.STATUS]), code=status.get(P.CODE),
                        steps=int(reply.metric_records.get(P.METRICS, MetricRecord()).get(P.DP_STEPS, 0)),
                        seconds=time.perf_counter() - started)
    return reply


def round_number(content: RecordDict) -> int:
    """The request's round number for the activity log; 0 when it has none that reads."""
    try:
        return int(content.config_records.get(P.CONFIG, ConfigRecord()).get(P.SERVER_ROUND, 0))
    except (TypeError, ValueError, OverflowError):
        return 0


def train_round(site: Site, content: RecordDict, state: RecordDict, *, server_round: int, run: str) -> RecordDict:
    """One round at one site: check the whole request, record the release in the ledger, distill, reply.

    Nothing is reserved in the ledger until the request has passed every check. `state`
    keeps the site's own student between rounds of a run when no weights are broadcast
    (exchange=logits broadcast=logits); Flower's `context.state` in the app.
    """
    config = site.config
    ledger = None
    try:
        request = content.config_records.get(P.CONFIG, ConfigRecord())
        rounds_left = check_round(config, request, server_round)
        check_assets(site, request)
        student = starting_student(site, content, state, server_round)
        plan = plan_round(config.distill)
        try:
            ledger = site.ledger()
            check_not_replayed(ledger, site, server_round=server_round, run=run)
            count = release_count(site, ledger, server_round=server_round, run=run)
            noise_multiplier = reserve_round(ledger, config, plan, server_round=server_round, rounds_left=rounds_left, run=run)
        except LedgerError as err:
            raise Refusal(P.REFUSAL_LEDGER, "the site's privacy ledger does not allow this round (details in the "
                          "site's log)", str(err)) from None
        except BudgetExhausted as err:
            raise Refusal(P.REFUSAL_BUDGET, f"the site's remaining budget cannot cover this round: {err}") from None
    except Refusal as refused:
        return refusal(site.name, refused, site, ledger)

    result = distill_locally(
        student,
        site.data,
        objective=site.objective,
        distill=config.distill,
        privacy=config.privacy,
        noise_multiplier=noise_multiplier,
        plan=plan,
        seed=config.seed * 1000 + server_round,
    )
    log.info("%s trained round %d: %d steps in %.1f s", site.name, server_round, result.steps, result.seconds)
    metrics = MetricRecord({P.DP_STEPS: result.steps, **privacy_metrics(site, ledger, noise_multiplier)})
    if count is not None:
        metrics[P.NOISY_COUNT] = count
    if not config.privacy.enabled:
        # The training loss is a statistic of the private records outside the DP mechanism:
        # it leaves the site only when there is no DP guarantee to break.
        metrics[P.TRAIN_LOSS] = result.loss
    reply = RecordDict({P.METRICS: metrics, P.CONFIG: ConfigRecord({P.STATUS: P.STATUS_OK, P.SITE: site.name})})
    if config.exchange.mode == "weights":
        reply[P.ARRAYS] = P.model_to_record(student)
        return reply
    if config.exchange.broadcast == "logits":
        state[P.STUDENT_STATE] = P.model_to_record(student)
    reply[P.LOGITS] = ArrayRecord({name: Array(array) for name, array in site.outputs.encode(student).items()})
    return reply


def check_round(config: Config, request: ConfigRecord, server_round: int) -> int:
    """The rounds this site is told it has left in the run, this one included; a Refusal if impossible."""
    most = config.rounds - server_round + 1
    try:
        rounds_left = int(request.get(P.ROUNDS_LEFT, most))
    except (TypeError, ValueError, OverflowError):
        raise Refusal(P.REFUSAL_BAD_REQUEST, f"{P.ROUNDS_LEFT} must be a whole number") from None
    if not (1 <= server_round <= config.rounds and 1 <= rounds_left <= most):
        raise Refusal(P.REFUSAL_BAD_REQUEST, f"round {server_round} with {rounds_left} rounds left does not fit a "
                                             f"run of {config.rounds} rounds")
    return rounds_left


def check_not_replayed(ledger: PrivacyLedger, site: Site, *, server_round: int, run: str) -> None:
    """Refuse a round this run already trained, or one more than the run and the policy allow."""
    trained = ledger.rounds_of(run)
    if server_round in trained:
        raise Refusal(P.REFUSAL_BAD_REQUEST, f"round {server_round} of this run was already trained")
    most = min(site.config.rounds, site.policy.max_rounds)
    if len(trained) >= most:
        raise Refusal(P.REFUSAL_POLICY, f"this run already trained {len(trained)} rounds, its limit "
                                        f"(rounds, site.max_rounds)")


def check_assets(site: Site, request: ConfigRecord) -> None:
    """Refuse before any training when the server's teacher or public set is not this site's, or
    the site's own are not the ones its policy pins."""
    mine, pins = site.assets, site.policy
    for key, pinned in ((P.TEACHER_SHA256, pins.teacher_sha256), (P.PUBLIC_SHA256, pins.public_sha256)):
        if pinned is not None and mine[key] != pinned:
            raise Refusal(P.REFUSAL_SITE_ERROR, "the site's own teacher or public set is not the one its policy pins",
                          f"{key}: the site's files give {mine[key]}, its policy pins {pinned}: get the pinned files "
                          "from the coordinator or update the pin (fedistill site-check shows both)")
    if request.get(P.TEACHER_SHA256) != mine[P.TEACHER_SHA256]:
        raise Refusal(P.REFUSAL_TEACHER, "the server's teacher does not match this site's: the site will not distill "
                      "from a teacher it cannot check is the agreed one",
                      f"server's teacher {request.get(P.TEACHER_SHA256)}, site's {mine[P.TEACHER_SHA256]}")
    theirs = {k: request.get(k) for k in (P.PUBLIC_COUNT, P.PUBLIC_SHA256)}
    if theirs != {k: mine[k] for k in theirs}:
        raise Refusal(P.REFUSAL_PUBLIC_SET, "the server's public set does not match this site's: the site will not "
                      "train or send outputs on inputs it cannot check are the agreed public ones",
                      f"server's public set {theirs}, site's {mine}")


def starting_student(site: Site, content: RecordDict, state: RecordDict, server_round: int) -> nn.Module:
    """The student this round's private training starts from; a Refusal on a malformed request.

    The global student when weights are broadcast; otherwise the site's own student from
    the previous round, first fitted to the consensus logits on the public inputs (FedMD).
    Every array the server sends must be finite and within `exchange.max_abs_value`.
    """
    student = site.new_student()
    exchange = site.config.exchange
    try:
        if exchange.mode == "weights" or exchange.broadcast == "weights":
            if P.ARRAYS not in content.array_records:
                raise ValueError(f"no {P.ARRAYS!r} (the global student) in the request")
            check_finite(content[P.ARRAYS], exchange.max_abs_value)
            P.load_record(student, content[P.ARRAYS])
            return student
        if P.STUDENT_STATE in state.array_records:
            P.load_record(student, state[P.STUDENT_STATE])
        if P.CONSENSUS in content.array_records and exchange.public_fit_epochs > 0:
            problem = P.check_arrays(content[P.CONSENSUS], site.outputs.target_spec(), max_abs=exchange.max_abs_value,
                                     max_bytes=sys.maxsize)
            if problem:
                raise ValueError(f"the consensus: {problem}")
            consensus = {name: torch.from_numpy(array.numpy()) for name, array in content[P.CONSENSUS].items()}
            fit = dataclasses.replace(exchange.server, epochs=exchange.public_fit_epochs)
            site.outputs.fit(student, consensus, fit, seed=(site.config.seed * 1000 + site.index) * 1000 + server_round)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise Refusal(P.REFUSAL_BAD_REQUEST, f"the server's request is malformed: {err}") from None
    return student


def check_finite(record: ArrayRecord, max_abs: float) -> None:
    for name, array in record.items():
        values = array.numpy()
        if values.dtype.kind == "f" and values.size and not (np.isfinite(values).all() and np.abs(values).max() <= max_abs):
            raise ValueError(f"array {name!r} holds NaN, infinite or values beyond exchange.max_abs_value {max_abs:g}")


def release_count(site: Site, ledger: PrivacyLedger, *, server_round: int, run: str) -> float | None:
    """With exchange.weighting=noisy_count, the site's record count plus Gaussian noise, charged in
    the ledger before it leaves (once per set of records); None with uniform weighting."""
    exchange = site.config.exchange
    if exchange.weighting != "noisy_count":
        return None
    privacy = site.config.privacy
    limit = Budget(privacy.epsilon, privacy.delta) if privacy.enabled else ledger.budget
    return ledger.release_noisy_count(limit=limit, count=len(site.data), noise=exchange.count_noise,
                                      run=run, round=server_round)


def reserve_round(
    ledger: PrivacyLedger, config: Config, plan: StepPlan, *, server_round: int, rounds_left: int, run: str
) -> float | None:
    """Record this round's release in the ledger before it happens; the noise multiplier under DP.

    Under DP the noise is calibrated every round against what remains of the budget, for
    the rounds the site has left in the run (the server says how many it sampled the site
    for; a server that says too few only makes the site spend its budget sooner, never more).
    Without DP the round is recorded as an unbounded release.
    """
    privacy = config.privacy
    if not privacy.enabled:
        ledger.record_release_without_dp(sample_rate=plan.sample_rate, steps=plan.steps, run=run, round=server_round)
        return None
    limit = Budget(privacy.epsilon, privacy.delta)
    noise = ledger.calibrate(limit=limit, sample_rate=plan.sample_rate, steps=plan.steps * rounds_left,
                             max_noise_multiplier=privacy.max_noise_multiplier)
    ledger.reserve(limit=limit, noise_multiplier=noise, sample_rate=plan.sample_rate, steps=plan.steps,
                   run=run, round=server_round)
    return noise


def privacy_metrics(site: Site, ledger: PrivacyLedger | None, noise_multiplier: float | None) -> dict[str, float]:
    """Epsilon spent at the run's delta, against the run's limit: the terms the run's report states."""
    privacy = site.config.privacy
    metrics = {P.EPSILON_BUDGET: privacy.epsilon}
    if ledger is not None:
        metrics[P.EPSILON_SPENT] = ledger.epsilon_spent(privacy.delta)
    if noise_multiplier is not None:
        metrics[P.NOISE_MULTIPLIER] = noise_multiplier
    return metrics


def refusal(name: str, refused: Refusal, site: Site | None = None, ledger: PrivacyLedger | None = None) -> RecordDict:
    """A reply that this site will not train this round: a code and a short reason."""
    log.warning("%s refuses the round (%s): %s", name, refused.code, refused.detail)
    status = ConfigRecord({P.STATUS: P.STATUS_REFUSED, P.SITE: name, P.CODE: refused.code, P.REASON: refused.reason})
    reply = RecordDict({P.CONFIG: status})
    if site is not None:
        reply[P.METRICS] = MetricRecord(privacy_metrics(site, ledger, None))
    return reply
