"""A site's admission of a request: every check that needs nothing of its records, in order.

Each check refuses with a code and a short reason that depend only on the request, the
site's policy and files it chose (conf/, its site file, its teacher and public set), never
on its records; so two sites that differ in one record answer them identically. The
records are read only once a round has passed all of these (client/round.py).
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from client.site import Site
from common import payload as P
from common.config import Config, ConfigError
from common.policy import SitePolicy
from common.request import RequestError, RunRequest, decode
from common.site_config import available_tasks, site_config

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A round this site will not train: `code` and `reason` may leave the site, `detail` stays in its log."""

    def __init__(self, code: str, reason: str, detail: str = ""):
        super().__init__(reason)
        self.code, self.reason, self.detail = code, reason, detail or reason


def bad_request(err: RequestError) -> Refusal:
    """A request outside the schema: one fixed reason leaves the site, what was wrong stays in its log."""
    return Refusal(P.REFUSAL_BAD_REQUEST, RequestError.REASON, err.detail)


def read_request(request: ConfigRecord) -> RunRequest:
    """The run request in a round's config record; a Refusal with one fixed reason otherwise."""
    try:
        return decode(request.get(P.REQUEST))
    except RequestError as err:
        raise bad_request(err) from None


def admit(request: RunRequest, policy: SitePolicy) -> Config:
    """The configuration this site runs `request` with, once the policy allows it (checked before
    any task is built: a package.module:factory source runs code); a Refusal otherwise."""
    problems = policy.violations(request)
    if problems:
        raise Refusal(P.REFUSAL_POLICY, "; ".join(problems))
    if request.task not in available_tasks() and ":" not in request.source:
        raise bad_request(RequestError("the request names a task that this app's conf/task/ does not hold"))
    try:
        return site_config(policy, request)
    except RequestError as err:
        raise bad_request(err) from None
    except ConfigError as err:
        raise site_settings_error(err) from None


def check_round(config: Config, request: ConfigRecord, server_round: int) -> int:
    """The rounds this site is told it has left in the run, this one included; a Refusal if impossible."""
    most = config.rounds - server_round + 1
    rounds_left = request.get(P.ROUNDS_LEFT, most)
    if type(rounds_left) is not int or not (1 <= server_round <= config.rounds and 1 <= rounds_left <= most):
        raise Refusal(P.REFUSAL_BAD_REQUEST, "the round number and rounds left do not fit the run's rounds")
    return rounds_left


def server_round_of(request: ConfigRecord) -> int:
    """The request's round number; a Refusal if it is not a whole number."""
    server_round = request.get(P.SERVER_ROUND)
    if type(server_round) is not int:
        raise Refusal(P.REFUSAL_BAD_REQUEST, f"the request has no whole {P.SERVER_ROUND}")
    return server_round


def check_assets(assets: dict[str, int | str], policy: SitePolicy, request: ConfigRecord) -> None:
    """Refuse before any training when the server's teacher or public set is not this site's
    (`assets`), or the site's own are not the ones its policy pins."""
    for key, pinned in ((P.TEACHER_SHA256, policy.teacher_sha256), (P.PUBLIC_SHA256, policy.public_sha256)):
        if pinned is not None and assets[key] != pinned:
            raise Refusal(P.REFUSAL_SITE_ERROR, "the site's own teacher or public set is not the one its policy pins",
                          f"{key}: the site's files give {assets[key]}, its policy pins {pinned}: get the pinned files "
                          "from the coordinator or update the pin (fedistill site-check shows both)")
    if request.get(P.TEACHER_SHA256) != assets[P.TEACHER_SHA256]:
        raise Refusal(P.REFUSAL_TEACHER, "the server's teacher does not match this site's: the site will not distill "
                      "from a teacher it cannot check is the agreed one")
    if any(request.get(k) != assets[k] for k in (P.PUBLIC_COUNT, P.PUBLIC_SHA256)):
        raise Refusal(P.REFUSAL_PUBLIC_SET, "the server's public set does not match this site's: the site will not "
                      "train or send outputs on inputs it cannot check are the agreed public ones")


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
            seed = (site.config.seed * 1000 + site.index) * 1000 + server_round
            site.outputs.fit(student, consensus, fit, seed=seed, device=site.task.device)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise Refusal(P.REFUSAL_BAD_REQUEST, "the server's global student or consensus does not fit this run's "
                      "student (the site's log says how)", str(err)) from None
    return student


def check_finite(record: ArrayRecord, max_abs: float) -> None:
    for name, array in record.items():
        values = array.numpy()
        if values.dtype.kind == "f" and values.size and not (np.isfinite(values).all() and np.abs(values).max() <= max_abs):
            raise ValueError(f"array {name!r} holds NaN, infinite or values beyond exchange.max_abs_value {max_abs:g}")


def site_settings_error(err: ConfigError) -> Refusal:
    """The site's own settings do not compose or its records do not load: the same for every request."""
    return Refusal(P.REFUSAL_SITE_ERROR, "the site could not take part in this round (details in the site's log)",
                   str(err))
