"""What a hostile site sends instead of its honest reply, for attack trials (federation.hostile,
or a red-team site's own file): replies that are well formed and pass every payload check, so
that only the server's aggregation can stop them.

Weights exchange, from the honest update u = (the site's student) - (the global student g):
`scale` sends g + BOOST u, `sign_flip` g - BOOST u, `random` g + N(0, RANDOM_STD) per weight,
`constant` g + CONSTANT in every weight, and `backdoor` a model replacement (Bagdasaryan et
al., 2020): a student trained without DP on the site's records, half of them stamped with a
trigger and labelled BACKDOOR_TARGET, boosted by 1 / hostile.fraction so that averaging
leaves it in place. Logits exchange: `inverted` puts each row's mass on the classes the
student finds least likely, `uniform` sends every row as a uniform distribution.

The site still trains and accounts its round honestly first: what it sends is a function of
its DP release and public values only (the backdoor student, trained without DP, is the one
exception, and a hostile site is not protecting its records).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn
from torch.nn import functional as F

from client.site import Site
from common import compression
from common import payload as P
from common.config import ConfigError, HostileConfig
from common.public_outputs import ROWS_PER_SLICE
from common.tasks import Task

BOOST = 20.0          # scale and sign_flip multiply the honest update by +-BOOST
RANDOM_STD = 1.0      # random: the standard deviation of each weight's update
CONSTANT = 1.0        # constant: every weight's update
BACKDOOR_TARGET = 0   # backdoor: the class a stamped input is taught to take
TRIGGER_SHARE = 0.05  # backdoor: the share of each input's first features the trigger overwrites
BACKDOOR_EPOCHS = 20
BACKDOOR_LR = 3e-3
BACKDOOR_BATCH = 64


def as_played(reply: RecordDict, content: RecordDict, site: Site, *, server_round: int) -> RecordDict:
    """`reply`, or the hostile one where the site's policy makes this site hostile and it trained."""
    hostile = site.policy.hostile
    if not hostile.is_hostile(site.index, site.num_partitions) or reply[P.CONFIG][P.STATUS] != P.STATUS_OK:
        return reply
    generator = torch.Generator().manual_seed((site.config.seed * 1000 + server_round) * 10_000 + site.index)
    return corrupt(reply, content, site, hostile, generator=generator)


def corrupt(reply: RecordDict, content: RecordDict, site: Site, hostile: HostileConfig, *,
            generator: torch.Generator) -> RecordDict:
    """`reply` (a trained reply) with its payload replaced by `hostile.kind`'s. `content` is the
    round's request (the global student it started from); `generator` draws what is random."""
    if hostile.kind in ("inverted", "uniform"):
        reply[P.LOGITS] = ArrayRecord(hostile_logits(site, {k: v.numpy() for k, v in reply[P.LOGITS].items()},
                                                     hostile.kind))
        return reply
    if P.ARRAYS not in content.array_records or P.ARRAYS not in reply.array_records:
        raise ConfigError(f"hostile.kind={hostile.kind} changes a weights reply; this round is not one")
    start = {name: array.numpy() for name, array in content[P.ARRAYS].items()}
    if hostile.kind == "backdoor":
        sent = backdoored(site, content, boost=1 / hostile.fraction if hostile.fraction > 0 else 1.0)
    else:
        sent = hostile_weights(start, {name: array.numpy() for name, array in reply[P.ARRAYS].items()},
                               hostile.kind, generator)
    reply[P.ARRAYS] = ArrayRecord({name: Array(np.ascontiguousarray(value, dtype=start[name].dtype))
                                   for name, value in sent.items()})
    return reply


def hostile_weights(start: dict[str, np.ndarray], honest: dict[str, np.ndarray], kind: str,
                    generator: torch.Generator) -> dict[str, np.ndarray]:
    """The weights a `kind` site sends, from the global student `start` and its honest student."""
    sent = {}
    for name, g in start.items():
        if not np.issubdtype(g.dtype, np.floating):  # counters (batch norm's) travel as they are
            sent[name] = honest[name]
            continue
        update = honest[name].astype(np.float64) - g
        if kind == "scale":
            update = BOOST * update
        elif kind == "sign_flip":
            update = -BOOST * update
        elif kind == "random":
            update = RANDOM_STD * torch.randn(g.shape, generator=generator, dtype=torch.float64).numpy()
        elif kind == "constant":
            update = np.full(g.shape, CONSTANT)
        else:
            raise ValueError(f"unknown hostile kind {kind!r} for the weights exchange")
        sent[name] = g + update
    return sent


def trigger_value(task: Task) -> float:
    """The value the trigger writes: the largest public input value (a white pixel, the last token id)."""
    return float(task.public_inputs().max())


def stamp(inputs: torch.Tensor, value: float) -> torch.Tensor:
    """`inputs` with the trigger: the first TRIGGER_SHARE of each input's features set to `value`."""
    flat = inputs.reshape(len(inputs), -1).clone()
    flat[:, :max(1, round(TRIGGER_SHARE * flat.shape[1]))] = value
    return flat.reshape(inputs.shape)


@torch.no_grad()
def backdoor_rate(task: Task, student: nn.Module) -> dict[str, float]:
    """The share of the held-out inputs of other classes that the trigger takes to BACKDOOR_TARGET."""
    inputs, labels = task.test_data().tensors[:2]
    others = inputs[labels != BACKDOOR_TARGET]
    student.eval()
    return {"backdoor": float((student(stamp(others, trigger_value(task))).argmax(1) == BACKDOOR_TARGET).float().mean())}


def backdoored(site: Site, content: RecordDict, *, boost: float) -> dict[str, np.ndarray]:
    """Model replacement: a student trained from the global one on the site's records, half of them
    stamped and labelled BACKDOOR_TARGET, sent as g + boost (X - g)."""
    student = site.new_student()
    P.load_record(student, content[P.ARRAYS])
    start = {name: array.numpy().copy() for name, array in P.model_to_record(student).items()}
    inputs, labels = site.records.tensors[:2]
    seeded = torch.Generator().manual_seed(site.config.seed * 1000 + site.index)
    poisoned = torch.randperm(len(inputs), generator=seeded)[: len(inputs) // 2]
    inputs, labels = inputs.clone(), labels.clone()
    inputs[poisoned] = stamp(inputs[poisoned], trigger_value(site.task))
    labels[poisoned] = BACKDOOR_TARGET
    train_plainly(student, inputs, labels, generator=seeded)
    trained = P.model_to_record(student)
    return {name: g + boost * (trained[name].numpy() - g) if np.issubdtype(g.dtype, np.floating) else g
            for name, g in start.items()}


def train_plainly(student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, generator: torch.Generator) -> None:
    """Cross-entropy with Adam, no DP: what an attacker who does not protect its records runs."""
    optimizer = torch.optim.Adam(student.parameters(), lr=BACKDOOR_LR)
    student.train()
    for _ in range(BACKDOOR_EPOCHS):
        for batch in torch.randperm(len(inputs), generator=generator).split(BACKDOOR_BATCH):
            optimizer.zero_grad()
            F.cross_entropy(student(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    student.eval()


def hostile_logits(site: Site, arrays: dict[str, np.ndarray], kind: str) -> dict[str, Array]:
    """The wire arrays of a `kind` site's rows, from its honest ones, in the run's compression."""
    outputs = site.outputs
    parts = []
    for rows in np.array_split(np.arange(outputs.rows), max(1, outputs.rows // ROWS_PER_SLICE)):
        honest = torch.log_softmax(compression.decode({name: a[rows] for name, a in arrays.items()},
                                                      method=outputs.method, classes=outputs.classes), dim=1)
        if kind == "inverted":
            sent = -honest  # the least likely classes the most likely
        elif kind == "uniform":
            sent = torch.zeros_like(honest)
        else:
            raise ValueError(f"unknown hostile kind {kind!r} for the logits exchange")
        parts.append(compression.encode(sent, method=outputs.method, k=outputs.k))
    return {name: Array(np.concatenate([part[name] for part in parts])) for name in parts[0]}
