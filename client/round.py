"""One round at one site: admit it in the ledger, distill under DP, reply with what may leave.

Everything the site sends is listed in `common.payload.RELEASED_UNDER_DP` with the reason it
may leave; a refusal carries a code and a short reason, and details stay in the site's log.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.admission import Refusal, check_assets, check_round, site_settings_error, starting_student
from client.dp_train import distill_locally
from client.hostile import as_played
from client.site import Site
from common import payload as P
from common.config import ConfigError
from common.privacy import Budget, BudgetExhausted, LedgerError, PrivacyLedger, RoundAlreadyTrained, RoundLimit
from common.step_plan import plan_round

log = logging.getLogger(__name__)


def train_round(site: Site, content: RecordDict, state: RecordDict, *, server_round: int, run: str,
                generator: torch.Generator | None = None) -> RecordDict:
    """One round at one site: check the whole request, record the release in the ledger, distill, reply.

    The checks that need nothing of the records come first; the records are read after them,
    and nothing is recorded in the ledger until the whole request has passed. `state` keeps
    the site's own student between rounds of a run when no weights are broadcast
    (exchange=logits broadcast=logits): Flower's `context.state`. `generator` draws the DP
    batches and noise; None: one seeded from the operating system's entropy (tests inject one).
    """
    config = site.config
    ledger = None
    try:
        request = content.config_records.get(P.CONFIG, ConfigRecord())
        rounds_left = check_round(config, request, server_round)
        check_assets(site.assets, site.policy, request)
        student = starting_student(site, content, state, server_round)
        try:
            data = site.data
        except ConfigError as err:
            raise site_settings_error(err) from None
        plan = plan_round(config.distill, config.privacy, site.plan_size)
        try:
            ledger = site.ledger()
            count = release_count(site, ledger, server_round=server_round, run=run)
            privacy = config.privacy
            noise_multiplier = ledger.admit_round(
                run=run, round=server_round, most_rounds=min(config.rounds, site.policy.max_rounds),
                sample_rate=plan.sample_rate, steps=plan.steps,
                limit=Budget(privacy.epsilon, privacy.delta) if privacy.enabled else None,
                planned_steps=plan.steps * rounds_left, max_noise_multiplier=privacy.max_noise_multiplier)
        except LedgerError as err:
            raise Refusal(P.REFUSAL_LEDGER, "the site's privacy ledger does not allow this round (details in the "
                          "site's log)", str(err)) from None
        except BudgetExhausted as err:
            raise Refusal(P.REFUSAL_BUDGET, "the site's remaining budget cannot cover the rounds it has left in this run "
                          "(within privacy.max_noise_multiplier; the site's log says what is spent)", str(err)) from None
        except RoundAlreadyTrained as err:
            raise Refusal(P.REFUSAL_BAD_REQUEST, str(err)) from None
        except RoundLimit as err:
            raise Refusal(P.REFUSAL_POLICY, str(err)) from None
    except Refusal as refused:
        return refusal(site.name, refused, site, ledger, run)

    result = distill_locally(
        student,
        data,
        objective=site.objective,
        distill=config.distill,
        privacy=config.privacy,
        noise_multiplier=noise_multiplier,
        plan=plan,
        seed=config.seed * 1000 + server_round,
        generator=generator,
        device=site.task.device,
    )
    log.info("%s trained round %d: %d steps", site.name, server_round, result.steps)
    metrics = MetricRecord({P.DP_STEPS: result.steps, P.SAMPLE_RATE: plan.sample_rate,
                            **privacy_metrics(site, ledger, noise_multiplier, run)})
    if count is not None:
        metrics[P.NOISY_COUNT] = count
    if not config.privacy.enabled:
        # The training loss is a statistic of the private records outside the DP mechanism:
        # it leaves the site only when there is no DP guarantee to break.
        metrics[P.TRAIN_LOSS] = result.loss
    reply = RecordDict({P.METRICS: metrics, P.CONFIG: ConfigRecord({P.STATUS: P.STATUS_OK, P.SITE: site.name})})
    if config.exchange.mode == "weights":
        reply[P.ARRAYS] = P.model_to_record(student)
    else:
        if config.exchange.broadcast == "logits":
            state[P.STUDENT_STATE] = P.model_to_record(student)
        reply[P.LOGITS] = ArrayRecord({name: Array(array) for name, array in site.outputs.encode(student).items()})
    return as_played(reply, content, site, server_round=server_round)


def release_count(site: Site, ledger: PrivacyLedger, *, server_round: int, run: str) -> float | None:
    """With exchange.weighting=noisy_count, the site's record count plus Gaussian noise, charged in
    the ledger before it leaves (once per set of records); None with uniform weighting."""
    exchange = site.config.exchange
    if exchange.weighting != "noisy_count":
        return None
    privacy = site.config.privacy
    limit = Budget(privacy.epsilon, privacy.delta) if privacy.enabled else ledger.budget
    return ledger.release_noisy_count(limit=limit, count=len(site.records), noise=exchange.count_noise,
                                      run=run, round=server_round)


def privacy_metrics(site: Site, ledger: PrivacyLedger | None, noise_multiplier: float | None,
                    run: str) -> dict[str, float]:
    """Epsilon this run spent, at its delta, against its limit: the terms the run's report states.
    The site's spend in other runs stays at the site."""
    privacy = site.config.privacy
    metrics = {P.EPSILON_BUDGET: privacy.epsilon}
    if ledger is not None:
        metrics[P.EPSILON_SPENT] = ledger.epsilon_of_run(run, privacy.delta)
    if noise_multiplier is not None:
        metrics[P.NOISE_MULTIPLIER] = noise_multiplier
    return metrics


def refusal(name: str, refused: Refusal, site: Site | None = None, ledger: PrivacyLedger | None = None,
            run: str = "") -> RecordDict:
    """A reply that this site will not train this round: a code and a short reason."""
    log.warning("%s refuses the round (%s): %s", name, refused.code, refused.detail)
    status = ConfigRecord({P.STATUS: P.STATUS_REFUSED, P.SITE: name, P.CODE: refused.code, P.REASON: refused.reason})
    reply = RecordDict({P.CONFIG: status})
    if site is not None:
        reply[P.METRICS] = MetricRecord(privacy_metrics(site, ledger, None, run))
    return reply
