"""The ClientApp: a site distills its student on its private data under DP and sends weights or public logits."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import TensorDataset

from client.dp_train import StepPlan, distill_locally, plan_round
from common import compression
from common import payload as P
from common.config import Config, load_config
from common.public_distill import distill_on_public
from common.privacy import BudgetExhausted, LedgerError, PrivacyLedger
from common.task import Task, build_task

log = logging.getLogger(__name__)

app = ClientApp()


@dataclass(frozen=True)
class Site:
    """One site's identity, configuration, and private data with the teacher's logits."""

    name: str
    config: Config
    task: Task
    index: int
    data: TensorDataset  # (inputs, labels, teacher logits)
    ledger_dir: Path

    def new_student(self) -> nn.Module:
        """This site's student: the global architecture, or its own with different students per site."""
        student = self.config.student
        hidden = self.config.exchange.hidden_for(self.index, student.hidden)
        torch.manual_seed(self.config.seed * 1000 + self.index)
        return self.task.student(dataclasses.replace(student, hidden=hidden))


@lru_cache(maxsize=2)
def load_task(overrides: str) -> tuple[Config, Task]:
    """Config and task once per process, shared by every site this process plays."""
    config = load_config(overrides)
    return config, build_task(config)


@lru_cache(maxsize=None)
def load_site(overrides: str, partition_id: int, num_partitions: int, ledger_dir: str | None) -> Site:
    """Build a site once per process: its private data and the teacher's logits on it.

    One simulation worker plays many sites in turn, so every site stays cached (a site
    holds only its own slice of the data).
    """
    config, task = load_task(overrides)
    if num_partitions != config.sites:
        raise ValueError(
            f"this federation has {num_partitions} SuperNodes but the config says sites={config.sites}: "
            "start as many SuperNodes as sites"
        )
    private = task.private_data(partition_id, config.sites)
    inputs, labels = private.tensors
    teacher = task.teacher()
    with torch.inference_mode():
        teacher_logits = teacher(inputs)  # computed once: halves the cost of a KD step
    name = f"site-{partition_id}"
    root = Path(ledger_dir) if ledger_dir else config.ledger_root / name
    return Site(name, config, task, partition_id, TensorDataset(inputs, labels, teacher_logits.clone()), root)


def site_from_context(context: Context) -> Site:
    node = context.node_config
    return load_site(
        str(context.run_config["overrides"]),
        int(node["partition-id"]),
        int(node["num-partitions"]),
        str(node["ledger-dir"]) if "ledger-dir" in node else None,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = site_from_context(context)
    server_round = int(msg.content[P.CONFIG][P.SERVER_ROUND])
    content = train_round(site, msg.content, context.state, server_round=server_round, run=str(context.run_id))
    return Message(content=content, reply_to=msg)


def train_round(site: Site, content: RecordDict, state: RecordDict, *, server_round: int, run: str) -> RecordDict:
    """One round at one site: check the request, reserve budget in the ledger, distill, reply.

    `state` keeps the site's own student between rounds of a run when no weights are
    broadcast (exchange=logits broadcast=logits); Flower's `context.state` in the app.
    """
    config = site.config
    exchange = config.exchange
    if exchange.mode == "logits":
        problem = public_set_mismatch(site, content.config_records.get(P.CONFIG, ConfigRecord()))
        if problem:
            return refusal(site, None, problem)
    try:
        # Built before any budget is reserved: a malformed request must not cost epsilon.
        student = starting_student(site, content, state)
    except (KeyError, ValueError, RuntimeError) as err:
        return refusal(site, None, f"the server's request is malformed: {err}")
    plan = plan_round(len(site.data), config.distill)
    noise_multiplier = None
    ledger = None
    if config.privacy.enabled:
        try:
            ledger = PrivacyLedger(site.ledger_dir, delta=config.privacy.delta)
            noise_multiplier = run_noise(ledger, config, plan, run)
            ledger.reserve(
                budget=config.privacy.epsilon,
                noise_multiplier=noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=plan.steps,
                run=run,
                round=server_round,
            )
        except (BudgetExhausted, LedgerError) as err:
            return refusal(site, ledger, str(err))

    result = distill_locally(
        student,
        site.data,
        distill=config.distill,
        privacy=config.privacy,
        noise_multiplier=noise_multiplier,
        plan=plan,
        seed=config.seed * 1000 + server_round,
    )
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(site.data),
            P.DP_STEPS: result.steps,
            P.TRAIN_SECONDS: result.seconds,
            **privacy_metrics(site, ledger, noise_multiplier),
        }
    )
    if not config.privacy.enabled:
        # The training loss is a statistic of the private records outside the DP mechanism:
        # it leaves the site only when there is no DP guarantee to break.
        metrics[P.TRAIN_LOSS] = result.loss
    reply = RecordDict({P.METRICS: metrics, P.CONFIG: ConfigRecord({P.STATUS: P.STATUS_OK, P.SITE: site.name})})
    if exchange.mode == "weights":
        reply[P.ARRAYS] = P.model_to_record(student)
        return reply
    if exchange.broadcast == "logits":
        state[P.STUDENT_STATE] = P.model_to_record(student)
    with torch.no_grad():
        public_logits = student(site.task.public_inputs())  # [P, C]
    encoded = compression.encode(public_logits, method=exchange.compression, k=exchange.topk)
    reply[P.LOGITS] = ArrayRecord({k: Array(v) for k, v in encoded.items()})
    return reply


def public_set_mismatch(site: Site, request: ConfigRecord) -> str:
    """Why the server's public set is not this site's, or ''."""
    mine = P.public_manifest(site.task.public_inputs())
    theirs = {k: request.get(k) for k in mine}
    if theirs != mine:
        return (
            f"the server's public set {theirs} does not match this site's {mine}: the site will not "
            "send logits on inputs it cannot check are the agreed public ones"
        )
    return ""


def starting_student(site: Site, content: RecordDict, state: RecordDict) -> nn.Module:
    """The student this round's private training starts from; ValueError on a malformed request.

    The global student when weights are broadcast; otherwise the site's own student from
    the previous round, first fitted to the consensus logits on the public inputs (FedMD).
    """
    student = site.new_student()
    exchange = site.config.exchange
    if exchange.mode == "weights" or exchange.broadcast == "weights":
        if P.ARRAYS not in content.array_records:
            raise ValueError(f"no {P.ARRAYS!r} (the global student) in the request")
        P.load_record(student, content[P.ARRAYS])
        return student
    if P.STUDENT_STATE in state.array_records:
        P.load_record(student, state[P.STUDENT_STATE])
    if P.CONSENSUS in content.array_records and exchange.public_fit_epochs > 0:
        public = site.task.public_inputs()
        consensus = torch.from_numpy(content[P.CONSENSUS][P.LOGITS].numpy()).float()
        expected = (len(public), site.task.num_classes)
        if tuple(consensus.shape) != expected or not torch.isfinite(consensus).all():
            raise ValueError(f"consensus logits must be finite with shape {list(expected)}, got {list(consensus.shape)}")
        fit = dataclasses.replace(exchange.server, epochs=exchange.public_fit_epochs)
        distill_on_public(student, public, consensus, fit, seed=site.config.seed + site.index)
    return student


def run_noise(ledger: PrivacyLedger, config: Config, plan: StepPlan, run: str) -> float:
    """The run's noise multiplier: calibrated once, at the site's first round in the run.

    It is calibrated so that all of the run's rounds fit in what remains of the budget,
    and reused for the run's later rounds (the plan does not change within a run). A site
    whose remaining budget would need more noise than `privacy.max_noise_multiplier`
    refuses every round of the run, so a nearly spent budget is not used on rounds that
    could teach the student nothing.
    """
    noise = ledger.noise_of_run(run)
    if noise is not None:
        return noise
    return ledger.calibrate(
        budget=config.privacy.epsilon,
        sample_rate=plan.sample_rate,
        steps=plan.steps * config.rounds,
        max_noise_multiplier=config.privacy.max_noise_multiplier,
    )


def privacy_metrics(site: Site, ledger: PrivacyLedger | None, noise_multiplier: float | None) -> dict[str, float]:
    if not site.config.privacy.enabled:
        return {P.EPSILON_SPENT: float("inf"), P.EPSILON_BUDGET: float("inf"), P.NOISE_MULTIPLIER: 0.0}
    return {
        P.EPSILON_SPENT: ledger.epsilon_spent() if ledger is not None else float("nan"),
        P.EPSILON_BUDGET: site.config.privacy.epsilon,
        P.NOISE_MULTIPLIER: noise_multiplier or 0.0,
    }


def refusal(site: Site, ledger: PrivacyLedger | None, reason: str) -> RecordDict:
    """A clear reply that this site will not train this round, and why."""
    log.warning("%s refuses round: %s", site.name, reason)
    status = ConfigRecord({P.STATUS: P.STATUS_REFUSED, P.SITE: site.name, P.REASON: reason})
    metrics = MetricRecord({P.NUM_EXAMPLES: 0, **privacy_metrics(site, ledger, None)})
    return RecordDict({P.CONFIG: status, P.METRICS: metrics})
