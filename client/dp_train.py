"""Local distillation of the student on a site's private data, with Opacus DP-SGD.

The only module of the client that imports Opacus.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import DistillConfig, PrivacyConfig
from common.distill import DistillationLoss


@dataclass(frozen=True)
class StepPlan:
    """The DP-SGD steps of one round: what the ledger reserves before training."""

    sample_rate: float
    steps: int


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    seconds: float


def plan_round(num_records: int, config: DistillConfig) -> StepPlan:
    """The steps and sample rate Opacus will take and account for, computed as Opacus does.

    `make_private` turns a loader of `batches` batches into a Poisson loader with rate
    1 / batches that yields int(1 / rate) steps per epoch (one fewer than `batches` for
    some values, e.g. 93), and its accountant charges 1 / (that many steps) per step.
    """
    batches = math.ceil(num_records / config.batch_size)
    steps_per_epoch = int(1 / (1 / batches))
    return StepPlan(sample_rate=1 / steps_per_epoch, steps=config.local_epochs * steps_per_epoch)


def distill_locally(
    student: nn.Module,
    data: TensorDataset,
    *,
    distill: DistillConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float | None,
    plan: StepPlan,
    seed: int,
) -> TrainResult:
    """Train `student` in place on `data` = (inputs, labels, teacher logits).

    With privacy enabled: Poisson sampling, per-sample clipping to `privacy.max_grad_norm`
    and Gaussian noise `noise_multiplier`; the steps taken are checked against `plan`
    (what the ledger reserved) and any difference is an error, never ignored. `seed`
    orders batches only when privacy is disabled.
    """
    # DP sampling and noise must not be reproducible from the (public) config seed, or
    # anyone could regenerate and subtract the noise: seed them from the OS's entropy.
    # This is not a CSPRNG: Opacus's secure_mode needs torchcsprng, which has no wheels
    # for current torch.
    generator = torch.Generator().manual_seed(secrets.randbits(63) if privacy.enabled else seed)
    loader = DataLoader(data, batch_size=distill.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(student.parameters(), lr=distill.lr, momentum=distill.momentum)
    criterion = DistillationLoss(temperature=distill.temperature, alpha=distill.alpha)
    engine = hooks = None
    student.train()  # Opacus refuses a model in eval mode
    if privacy.enabled:
        if noise_multiplier is None:
            raise ValueError("privacy is enabled but no noise multiplier was calibrated")
        engine = PrivacyEngine(accountant="rdp")
        hooks, optimizer, loader = engine.make_private(
            module=student,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            loss_reduction="mean",
            wrap_model=False,
            noise_generator=generator,
        )
    start = time.perf_counter()
    total_loss, seen, steps = 0.0, 0, 0
    try:
        for _ in range(distill.local_epochs):
            for inputs, labels, teacher_logits in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(student(inputs), teacher_logits, labels)
                loss.backward()  # one backward per step: Opacus needs it for per-sample gradients
                optimizer.step()
                steps += 1
                total_loss += loss.item() * len(labels)
                seen += len(labels)
    finally:
        if hooks is not None:
            hooks.cleanup()
    student.eval()
    if engine is not None:
        taken = engine.accountant.history
        expected = [(noise_multiplier, plan.sample_rate, plan.steps)]
        if [tuple(h) for h in taken] != expected:
            raise RuntimeError(f"DP steps taken {taken} differ from the steps reserved in the ledger {expected}")
    elif steps != plan.steps:
        raise RuntimeError(f"took {steps} steps, planned {plan.steps}")
    return TrainResult(loss=total_loss / max(seen, 1), steps=steps, seconds=time.perf_counter() - start)
