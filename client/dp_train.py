"""Local distillation of the student on a site's private data, with Opacus DP-SGD.

The only module of the client that imports Opacus. Opacus's `make_private` derives the
sample rate (1 / batches) and the gradient normaliser (the expected batch size) from the
number of records. Under add/remove-one adjacency that number is private, and anything
computed from it that leaves the site (the noise calibrated for that sample rate, the
epsilon figures, the scale of the update) would release it outside the guarantee. So the
same Opacus parts are assembled here from a step plan that depends on public settings only.
"""

from __future__ import annotations

import secrets
import time
import warnings
from dataclasses import dataclass

import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import TensorDataset

from common.config import DistillConfig, PrivacyConfig
from common.device import CPU, placed, seeded_on
from common.step_plan import StepPlan


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    seconds: float


def noise_generator(privacy: PrivacyConfig, seed: int) -> torch.Generator:
    """The generator of a round's batches and noise.

    DP sampling and noise must not be reproducible from the (public) config seed, or anyone
    could regenerate and subtract the noise: under privacy it is seeded from the operating
    system's entropy. This is not a CSPRNG: Opacus's secure_mode needs torchcsprng, which has
    no wheels for current torch.
    """
    return torch.Generator().manual_seed(secrets.randbits(63) if privacy.enabled else seed)


def _backward(student: nn.Module, batch: tuple[torch.Tensor, ...], objective: nn.Module, optimizer: torch.optim.Optimizer,
              private: bool, *, chunk: int, expected_batch_size: int) -> float:
    """Gradients of one step's batch, in physical chunks of at most `chunk` records; returns
    the summed loss. With DP, every chunk but the last is clipped and accumulated by the
    DPOptimizer without a step (no noise, nothing accounted): the step, its noise and its
    accounting happen once, on the last chunk, for the whole batch. Without DP the chunks'
    gradients add up, rescaled as DPOptimizer does (summed gradients / expected batch size)."""
    inputs, labels, *targets = batch
    starts = range(0, len(labels), max(chunk, 1))
    total = 0.0
    for first in starts:
        part = slice(first, first + chunk)
        loss = objective(student, inputs[part], labels[part],
                         dict(zip(objective.target_kinds, (t[part] for t in targets))))
        count = len(labels[part])
        # One backward per chunk (Opacus needs it for per-sample gradients).
        with warnings.catch_warnings():
            # A student whose first layer is frozen (a causal LM's tied embeddings) has no input
            # that requires a gradient; torch then warns about its backward hooks, though every
            # trainable parameter's per-sample gradient is right (tests/common/test_causal_lm.py).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            (loss if private else loss * count / expected_batch_size).backward()
        total += loss.item() * count
        if private and first != starts[-1]:
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()  # clips and accumulates this chunk's per-sample gradients only
            optimizer.zero_grad(set_to_none=True)
    return total


def distill_locally(
    student: nn.Module,
    data: TensorDataset,
    *,
    objective: nn.Module,
    distill: DistillConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float | None,
    plan: StepPlan,
    seed: int,
    generator: torch.Generator | None = None,
    device: torch.device = CPU,
) -> TrainResult:
    """Train `student` in place on `data` = (inputs, labels, *teacher targets in the order of
    `objective.target_kinds`) for `plan.steps` steps, minimising `objective`.

    Batches are Poisson samples at `plan.sample_rate` with or without privacy. With privacy:
    per-sample clipping to `privacy.max_grad_norm` and Gaussian noise `noise_multiplier`;
    the steps Opacus's accountant records are checked against `plan` (what the ledger
    reserved) and any difference is an error, never ignored. `generator` draws the batches and
    the noise; None: one seeded from the operating system's entropy under privacy, from `seed`
    without (tests inject their own). The student trains on `device` (batches are drawn on the
    CPU and moved there; the noise is drawn there, by a generator seeded from `generator`) and
    is back on the CPU when this returns.
    """
    if generator is None:
        generator = noise_generator(privacy, seed)
    loader = DPDataLoader(data, sample_rate=plan.sample_rate, generator=generator)  # int(1/q) steps per pass
    with placed(student, device):
        return _train(student, loader, objective=objective, distill=distill, privacy=privacy,
                      noise_multiplier=noise_multiplier, plan=plan, device=device, noise=seeded_on(device, generator))


def _train(student: nn.Module, loader: DPDataLoader, *, objective: nn.Module, distill: DistillConfig,
           privacy: PrivacyConfig, noise_multiplier: float | None, plan: StepPlan, device: torch.device,
           noise: torch.Generator) -> TrainResult:
    """distill_locally's steps, with the student already on `device` and `noise` drawing there."""
    optimizer = torch.optim.SGD(student.parameters(), lr=plan.lr, momentum=distill.momentum)
    hooks = accountant = None
    student.train()
    if privacy.enabled:
        if noise_multiplier is None:
            raise ValueError("privacy is enabled but no noise multiplier was calibrated")
        ModuleValidator.validate(student, strict=True)
        hooks = prepare_module(student, grad_sample_mode="hooks", wrap_model=False,
                               batch_first=True, loss_reduction="mean")
        hooks.forbid_grad_accumulation()  # one backward per step: Poisson batches must not accumulate
        optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            loss_reduction="mean",
            generator=noise,
        )
        accountant = RDPAccountant()
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    start = time.perf_counter()
    total_loss, seen, steps = 0.0, 0, 0
    trainable = [p for p in student.parameters() if p.requires_grad]
    try:
        while steps < plan.steps:
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                if privacy.enabled and len(batch[0]) == 0:
                    # An empty Poisson batch is still a DP step: noise only, as the accountant assumes.
                    for param in trainable:
                        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=device)
                else:
                    total_loss += _backward(student, tuple(t.to(device) for t in batch), objective, optimizer,
                                            privacy.enabled, chunk=distill.max_physical_batch or len(batch[0]),
                                            expected_batch_size=plan.expected_batch_size)
                optimizer.step()
                steps += 1
                seen += len(batch[0])
                if steps == plan.steps:
                    break
    finally:
        if hooks is not None:
            hooks.cleanup()
    student.eval()
    if accountant is not None:
        taken = [tuple(h) for h in accountant.history]
        expected = [(noise_multiplier, plan.sample_rate, plan.steps)]
        if taken != expected:
            raise RuntimeError(f"DP steps taken {taken} differ from the steps reserved in the ledger {expected}")
    return TrainResult(loss=total_loss / max(seen, 1), steps=steps, seconds=time.perf_counter() - start)
