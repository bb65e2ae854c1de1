"""Message keys shared by the ServerApp and the ClientApp, and model <-> record conversion."""

from __future__ import annotations

import hashlib

import torch
from flwr.app import ArrayRecord
from torch import nn

# RecordDict keys
ARRAYS = "arrays"            # student weights (global down, site's up in weights mode)
LOGITS = "logits"            # a site's compressed student logits on the public inputs (up)
CONSENSUS = "consensus"      # the aggregated public logits (down, broadcast=logits)
CONFIG = "config"
METRICS = "metrics"
STUDENT_STATE = "student"    # a site's own student, kept in Flower's context.state within a run

# ConfigRecord keys
SERVER_ROUND = "server-round"
STATUS = "status"            # "ok" or "refused"
REASON = "reason"            # why a site refused
SITE = "site"                # the site's name, as it reports it
PUBLIC_COUNT = "public-count"    # the public set's manifest: how many inputs ...
PUBLIC_SHA256 = "public-sha256"  # ... and a hash of their contents

STATUS_OK = "ok"
STATUS_REFUSED = "refused"

# The ServerApp tags its progress log lines with this; `fedistill simulate` shows only those.
PROGRESS_TAG = "[fedistill] "

# MetricRecord keys
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON_SPENT = "epsilon-spent"
EPSILON_BUDGET = "epsilon-budget"
NOISE_MULTIPLIER = "noise-multiplier"
DP_STEPS = "dp-steps"
TRAIN_SECONDS = "train-seconds"


def model_to_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Load `record` into `model`, refusing missing, unexpected or mis-shaped tensors."""
    state = record.to_torch_state_dict()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def public_manifest(inputs: torch.Tensor) -> dict[str, int | str]:
    """Identifies the public set: the server sends it, a site with other inputs refuses."""
    data = inputs.detach().cpu().contiguous().float().numpy().tobytes()
    return {PUBLIC_COUNT: int(inputs.shape[0]), PUBLIC_SHA256: hashlib.sha256(data).hexdigest()}
