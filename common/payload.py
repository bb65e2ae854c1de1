"""Message keys shared by the ServerApp and the ClientApp, model <-> record conversion, and the
checks every received array passes."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from common.progress import PROGRESS_TAG  # noqa: F401  (the apps tag their progress lines with P.PROGRESS_TAG)

if TYPE_CHECKING:
    from common.tasks import Task

ArraySpec = dict[str, tuple[tuple[int, ...], str]]  # array name -> (shape, dtype)

# RecordDict keys
ARRAYS = "arrays"            # student weights (global down, site's up in weights mode)
LOGITS = "logits"            # a site's compressed student logits on the public inputs (up)
CONSENSUS = "consensus"      # the aggregated public logits (down, broadcast=logits)
CONFIG = "config"
METRICS = "metrics"
STUDENT_STATE = "student"    # a site's own student, kept in Flower's context.state within a run

# ConfigRecord keys
SERVER_ROUND = "server-round"
REQUEST = "request"          # down: the run request, JSON text of common.request's schema
ROUNDS_LEFT = "rounds-left"  # down: the rounds this site is sampled for from this one on, this one included
STATUS = "status"            # "ok" or "refused"
CODE = "code"                # why a site refused, one of the REFUSAL_* codes
REASON = "reason"            # a short text for the code; the details stay in the site's log
SITE = "site"                # the site's name, as it reports it
PUBLIC_COUNT = "public-count"    # the run's assets, announced every round: how many public inputs ...
PUBLIC_SHA256 = "public-sha256"  # ... a hash of their contents ...
TEACHER_SHA256 = "teacher-sha256"  # ... and of what the teacher is made from (Task.teacher_digest)

STATUS_OK = "ok"
STATUS_REFUSED = "refused"

REFUSAL_POLICY = "policy"            # the request lies outside the site's policy
REFUSAL_BAD_REQUEST = "bad-request"  # the request is malformed (config, weights, consensus, round numbers)
REFUSAL_PUBLIC_SET = "public-set"    # the server's public set is not the site's
REFUSAL_TEACHER = "teacher"          # the server's teacher is not the site's
REFUSAL_BUDGET = "budget"            # the remaining budget cannot cover the run's rounds
REFUSAL_LEDGER = "ledger"            # the ledger is unreadable or covers other records
REFUSAL_SITE_ERROR = "site-error"    # the site failed (its policy, data or code); the error stays in its log
REFUSAL_APP = "app"                  # the site runs no code of an app it has not pinned (fedistill.app_gate) ...
APP_NOT_PINNED = "AppNotVetted"      # ... and says so in the error reply that comes instead of the app's

# MetricRecord keys
TRAIN_LOSS = "train-loss"
EPSILON_SPENT = "epsilon-spent"
EPSILON_BUDGET = "epsilon-budget"
NOISE_MULTIPLIER = "noise-multiplier"
DP_STEPS = "dp-steps"
SAMPLE_RATE = "sample-rate"
NOISY_COUNT = "noisy-count"  # exchange.weighting=noisy_count: the record count plus Gaussian noise

_FROM_LEDGER = ("computed from the site's policy and its ledger, whose entries are public step plans (sample "
                "rate and steps come from the configuration), the rounds the site joined in this and earlier runs "
                "and any noisy count it released: no record and no record count enters it")

# Everything a site's reply may hold under DP, and why it may leave the site. Nothing else
# does: the server drops a reply that holds any other item, and the privacy report prints
# this table. Items are named record/key; an ArrayRecord is one item.
RELEASED_UNDER_DP: dict[str, str] = {
    ARRAYS: "the student's weights after DP-SGD (weights exchange): the output of the DP mechanism itself",
    LOGITS: "the DP-trained student's log-probabilities on the public inputs (logits exchange): a function "
            "of the DP output and of public inputs only, so post-processing",
    f"{CONFIG}/{STATUS}": "whether the site trained or refused: " + _FROM_LEDGER,
    f"{CONFIG}/{SITE}": "the site's name: public, it is how the site joined",
    f"{CONFIG}/{CODE}": "why the site refused, as a code: it depends on the request, the site's policy and its "
                        "ledger, never on the records",
    f"{CONFIG}/{REASON}": "a short text for that code, from the same public values (paths and details stay in "
                          "the site's log)",
    f"{METRICS}/{EPSILON_SPENT}": "epsilon spent after this round, at the run's delta: " + _FROM_LEDGER,
    f"{METRICS}/{EPSILON_BUDGET}": "the run's epsilon limit, which the site's policy allowed",
    f"{METRICS}/{NOISE_MULTIPLIER}": "the round's noise multiplier: " + _FROM_LEDGER,
    f"{METRICS}/{DP_STEPS}": "the round's DP-SGD steps: the public step plan",
    f"{METRICS}/{SAMPLE_RATE}": "the round's sample rate: the public step plan, from the run's settings and the size "
                                "class the site declares in its file (common/step_plan.py), never its record count",
    f"{METRICS}/{NOISY_COUNT}": "the site's record count plus Gaussian noise (exchange.weighting=noisy_count), "
                                "to weight the site: a Gaussian mechanism of sensitivity 1 under add/remove-one, "
                                "charged in the site's ledger before it is sent, released once per set of "
                                "records and noise level and reused after that",
}
# Sent only by a run without DP, which has no guarantee for them to break.
RELEASED_WITHOUT_DP: dict[str, str] = {
    f"{METRICS}/{TRAIN_LOSS}": "the training loss: a statistic of the private records",
}


def released_items(*, mode: str, weighting: str, dp: bool) -> dict[str, str]:
    """What a site's reply may hold in a run of this exchange mode, weighting and privacy, with why."""
    unused = {LOGITS if mode == "weights" else ARRAYS}
    if weighting == "uniform":
        unused.add(f"{METRICS}/{NOISY_COUNT}")
    items = {k: v for k, v in RELEASED_UNDER_DP.items() if k not in unused}
    return items if dp else {**items, **RELEASED_WITHOUT_DP}


def reply_items(content: RecordDict) -> set[str]:
    """The items of a reply, named as in RELEASED_UNDER_DP."""
    items = set(content.array_records)
    for name, record in (*content.config_records.items(), *content.metric_records.items()):
        items |= {f"{name}/{key}" for key in record}
    return items


def frozen_names(model: nn.Module) -> set[str]:
    """Parameters that never train (e.g. a text student's projected teacher embeddings): every
    site builds them identically, so they never travel. A name tied to a frozen parameter (a
    causal LM's output head, tied to its embeddings) is frozen with it."""
    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p.data_ptr() in frozen}


def model_to_record(model: nn.Module) -> ArrayRecord:
    frozen = frozen_names(model)
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen})


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Load `record` into `model`, refusing missing, unexpected or mis-shaped tensors (frozen
    parameters are not expected: they stay as built)."""
    state = record.to_torch_state_dict()
    frozen = frozen_names(model)
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    if set(missing) != frozen or unexpected or frozen & set(state):
        raise RuntimeError(f"the record does not fit the model: missing {sorted(set(missing) - frozen)}, "
                           f"unexpected {sorted(set(unexpected) | (frozen & set(state)))}")


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def public_manifest(inputs: torch.Tensor) -> dict[str, int | str]:
    """Identifies the public set: the server sends it, a site with other inputs refuses."""
    data = inputs.detach().cpu().contiguous().float().numpy().tobytes()
    return {PUBLIC_COUNT: int(inputs.shape[0]), PUBLIC_SHA256: hashlib.sha256(data).hexdigest()}


def asset_manifest(task: Task) -> dict[str, int | str]:
    """What the server announces every round and a site checks before training: neither the
    teacher nor the public set travels with the app, so both sides must hold the same ones."""
    return {**public_manifest(task.public_inputs()), TEACHER_SHA256: task.teacher_digest()}


def check_arrays(record: ArrayRecord, expected: ArraySpec, *, max_abs: float, max_bytes: int) -> str:
    """Why `record` is unacceptable, or '' if it holds exactly the expected, finite, bounded arrays."""
    if set(record.keys()) != set(expected):
        missing, extra = sorted(set(expected) - set(record.keys())), sorted(set(record.keys()) - set(expected))
        return f"expected arrays {sorted(expected)}, missing {missing}, unexpected {extra}"
    size = record_bytes(record)
    if size > max_bytes:
        return f"reply of {size} bytes exceeds the limit of {max_bytes} bytes (exchange.max_reply_mb)"
    for name, (shape, dtype) in expected.items():
        array = record[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return f"array {name!r} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
        values = array.numpy()
        if values.dtype.kind == "f":
            if not np.isfinite(values).all():
                return f"array {name!r} holds NaN or infinite values"
            if values.size and np.abs(values).max() > max_abs:
                return f"array {name!r} has |value| {np.abs(values).max():.3g} > exchange.max_abs_value {max_abs:g}"
    return ""
