"""Distillation on the public inputs, which costs no privacy: the server's warm start before
round 1, and fitting a student to the sites' consensus (FedDF / FedMD / DS-FL)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load_model
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from common.config import Config, DistillConfig, ServerDistillConfig
from common.device import CPU, placed
from common.losses import LOGITS
from common.payload import asset_manifest
from common.storage import atomic_write, filling, save_model


@dataclass(frozen=True)
class DistillReport:
    epochs: int             # epochs run before early stopping
    holdout_loss: float     # best loss on the held-out slice of the public records
    cached: bool = False    # read from the cache, as an earlier run fitted it


def soft_kl(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(target / T) || softmax(student / T)), mean over the batch. [B, C], [B, C] -> scalar."""
    t = temperature
    return t * t * F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(target_logits / t, dim=-1),
        reduction="batchmean", log_target=True,
    )


def distill_on_public(
    student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: ServerDistillConfig, *, seed: int,
    device: torch.device = CPU,
) -> DistillReport:
    """Fit `student` in place to `targets` [P, C] (soft labels) on `inputs` [P, ...]."""
    return fit_on_public(student, TensorDataset(inputs, targets),
                         lambda model, batch: soft_kl(model(batch[0]), batch[1], config.temperature), config, seed=seed,
                         device=device)


def fit_on_public(student: nn.Module, data: TensorDataset, loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
                  config: ServerDistillConfig, *, seed: int, held_out_from: int | None = None,
                  device: torch.device = CPU) -> DistillReport:
    """Minimise `loss(student, batch)` over `data` in place, with Adam and early stopping, on `device`.

    A seeded slice of `config.holdout` of the first `held_out_from` records (all by default:
    the real public inputs, not the ones made from them) is held out; the student with the
    lowest held-out loss is kept.
    """
    generator = torch.Generator().manual_seed(seed)
    candidates = held_out_from or len(data)
    order = torch.randperm(candidates, generator=generator)
    n_hold = max(1, int(round(config.holdout * candidates)))
    hold, train = order[:n_hold], torch.cat([order[n_hold:], torch.arange(candidates, len(data))])

    def rows(indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in data[indices])

    with placed(student, device):
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=config.lr)
        best_loss, best_state = _holdout_loss(student, rows(hold), loss), copy.deepcopy(student.state_dict())
        stale, epochs = 0, 0
        for epochs in range(1, config.epochs + 1):
            student.train()
            for batch in train[torch.randperm(len(train), generator=generator)].split(config.batch_size):
                optimizer.zero_grad()
                loss(student, rows(batch)).backward()
                optimizer.step()
            held_out = _holdout_loss(student, rows(hold), loss)
            if held_out < best_loss:
                best_loss, best_state, stale = held_out, copy.deepcopy(student.state_dict()), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
        student.load_state_dict(best_state)
    student.eval()
    return DistillReport(epochs=epochs, holdout_loss=best_loss)


@torch.no_grad()
def _holdout_loss(student: nn.Module, batch: tuple[torch.Tensor, ...], loss) -> float:
    student.eval()
    return loss(student, batch).item()


class TeacherTransfer:
    """What the teacher says about the public inputs and the free transfer inputs made from them
    (`exchange.server.transfer` of them, common/transfer.py), computed once: the server distills
    the global student toward it with the local objective, at no privacy cost, before round 1
    (`warm_start`) and, in the weights exchange, after each round (`distill_teacher`).

    Public labels are used where the task has them (a causal LM's next tokens); otherwise the
    teacher's soft labels alone. Early stopping holds out a slice of the real public inputs.
    """

    def __init__(self, task, distill: DistillConfig, config: ServerDistillConfig, *, seed: int):
        self.config, self.device = config, task.device
        inputs, labels = task.public_inputs(), task.public_labels()
        if labels is None:
            distill = dataclasses.replace(distill, alpha=1.0)
        self.objective = task.objective(distill)
        kinds = self.objective.target_kinds
        self.public = len(inputs)
        if config.transfer:
            inputs = torch.cat([inputs, task.transfer_inputs(config.transfer, seed)])
        targets = task.teacher_targets(inputs, kinds)
        if labels is None:
            labels = targets[LOGITS].argmax(-1)  # unused at alpha 1; the objective's signature wants labels
        self.data = TensorDataset(inputs, labels, *(targets[kind] for kind in kinds))

    def fit(self, student: nn.Module, *, seed: int) -> DistillReport:
        kinds = self.objective.target_kinds
        return fit_on_public(
            student, self.data,
            lambda model, batch: self.objective(model, batch[0], batch[1], dict(zip(kinds, batch[2:]))),
            self.config, seed=seed, held_out_from=self.public, device=self.device)


# The distillation settings the warm start depends on (it uses the local objective, not the DP step).
OBJECTIVE_SETTINGS = ("temperature", "alpha", "feature_weight", "attention_weight", "attention_layers")
WARM_START_VERSION = 1  # part of the cache key: raise it when the fit itself changes, so no older entry is read


def initial_student(task, config: Config) -> tuple[nn.Module, DistillReport | None]:
    """The global student before round 1: initialised from `config.seed`, then warm-started on
    the public (and transfer) inputs where exchange.server.warm_start says so (with that report).

    The warm start is the same for the same teacher, public set and settings, and costs every run
    as much as a round, so it is cached in `config.cache_path`, under a key of all it depends on."""
    torch.manual_seed(config.seed)
    student = task.student(config.student)
    if not config.exchange.server.warm_start:
        return student, None
    path = config.cache_path / f"warm-start-{warm_start_key(task, config)}.safetensors"
    with filling(path):
        if path.exists():
            load_model(student, path)
            student.eval()
            return student, DistillReport(**json.loads(path.with_suffix(".json").read_text()), cached=True)
        report = TeacherTransfer(task, config.distill, config.exchange.server, seed=config.seed).fit(student, seed=config.seed)
        atomic_write(path.with_suffix(".json"), json.dumps({"epochs": report.epochs,
                                                            "holdout_loss": report.holdout_loss}).encode())
        save_model(path, student)
    return student, report


def warm_start_key(task, config: Config) -> str:
    """What the warm-started student depends on: the teacher and public set by their digests (a file
    changed in place is another key), the task, student, objective and server-distillation settings,
    the seed, the device type, torch's version and the fit's own version."""
    parts = {"version": WARM_START_VERSION, "assets": asset_manifest(task), "task": repr(config.task),
             "student": repr(config.student), "objective": [repr(getattr(config.distill, key)) for key in OBJECTIVE_SETTINGS],
             "server": repr(config.exchange.server), "seed": config.seed, "device": task.device.type,
             "torch": torch.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
