"""`fedistill audit --step`: audit the sites' DP-SGD itself, white-box, with gradient canaries
(Nasr et al., "Tight auditing of differentially private machine learning", 2023), in one run
(Steinke, Nasr and Jagielski, 2023).

One round of the sites' own training code (`client.dp_train.distill_locally`: Opacus's Poisson
sampling, per-sample clipping, Gaussian noise and the fixed public normaliser, the expected
batch size), with the run's step plan for a site of the default size class, trains a linear
student. Its honest records' clipped gradients fill a few coordinates; each canary's is the
clipping norm along a coordinate of its own, and each canary is planted with probability 1/2.
The observer reads every canary's coordinate of the released update: how often the canary was
sampled, plus the noise. The noise is calibrated so that this one round spends the run's whole
epsilon, so the accountant's claim is as large as one round can test; a second run without
noise shows what the audit catches when nothing protects the records.

This asks whether dividing the noised sum by a fixed expected batch size leaks more than the
subsampled-Gaussian analysis assumes (arXiv 2605.15648): if it did, the bound would exceed the
accountant's epsilon. The report has `fedistill audit`'s form (audit.json, audit.md, audit.png).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from common.config import Config, ConfigError

CANARIES = 5000
HONEST_DIMENSIONS = 8  # where the honest records' gradients live; each canary has one more coordinate
OVERSHOOT = 10.0       # every record's raw gradient is this many clipping norms long: each one is clipped
VIEW = "every step's update, gradient canaries"


@dataclasses.dataclass(frozen=True)
class RoundSetting:
    """The audited round: the run's step plan for a site of the default size class, and the noise
    with which that round alone spends the run's epsilon."""
    records: int
    sample_rate: float
    steps: int
    expected_batch_size: int
    noise_multiplier: float
    delta: float

    @staticmethod
    def of(config: Config) -> RoundSetting:
        from common.step_plan import DEFAULT_SIZE_CLASS, plan_round

        if not config.privacy.enabled:
            raise ConfigError("fedistill audit --step audits the DP step: leave privacy=dp and set privacy.epsilon")
        plan = plan_round(config.distill, config.privacy, DEFAULT_SIZE_CLASS)
        return RoundSetting(records=DEFAULT_SIZE_CLASS, sample_rate=plan.sample_rate, steps=plan.steps,
                            expected_batch_size=plan.expected_batch_size,
                            noise_multiplier=noise_for(config.privacy.epsilon, plan.sample_rate, plan.steps,
                                                       config.privacy.delta),
                            delta=config.privacy.delta)

    def accountant_epsilon(self) -> float:
        from common.accounting import epsilon_of

        return epsilon_of([(self.noise_multiplier, self.sample_rate, self.steps)], delta=self.delta)


def noise_for(epsilon: float, sample_rate: float, steps: int, delta: float, tolerance: float = 1e-4) -> float:
    """The smallest noise multiplier (to `tolerance`) with which `steps` steps at `sample_rate`
    spend at most `epsilon`."""
    from common.accounting import epsilon_of, least_noise

    def within(sigma: float) -> bool:
        return epsilon_of([(sigma, sample_rate, steps)], delta=delta) <= epsilon

    most = 1.0
    while not within(most):
        most *= 2
    return least_noise(within, most, tolerance=tolerance)


def step_coordinates(setting: RoundSetting, config: Config, planted: np.ndarray,
                     noise_multiplier: float) -> np.ndarray:
    """[steps, canaries]: each canary's coordinate of each step's released update, in clipping
    norms per expected batch: 1 where the step sampled it (only if planted), plus the noise. The
    accountant assumes every step is released, as here. The steps add `noise_multiplier`'s noise
    (the setting's, none, or in a test a deliberately broken amount)."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from client.dp_train import distill_locally
    from common.step_plan import StepPlan

    count, clip = len(planted), config.privacy.max_grad_norm
    generator = torch.Generator().manual_seed(config.seed)
    directions = torch.randn(setting.records, HONEST_DIMENSIONS, generator=generator)
    honest = torch.cat([directions / directions.norm(dim=1, keepdim=True), torch.zeros(setting.records, count)], 1)
    canaries = torch.cat([torch.zeros(count, HONEST_DIMENSIONS), torch.eye(count)], 1)[torch.from_numpy(planted)]
    records = torch.cat([honest, canaries])
    lr = 1.0
    step = StepPlan(sample_rate=setting.sample_rate, steps=1, expected_batch_size=setting.expected_batch_size, lr=lr)

    def objective(student, inputs, labels, targets):  # a record's gradient: -OVERSHOOT * clip * its input
        return -(student(inputs)[:, 0] * OVERSHOOT * clip).mean()

    objective.target_kinds = ()
    student = nn.Linear(HONEST_DIMENSIONS + count, 1, bias=False)
    nn.init.zeros_(student.weight)
    data = TensorDataset(records, torch.zeros(len(records)))
    distill = dataclasses.replace(config.distill, momentum=0.0, max_physical_batch=0)
    coordinates = []
    for index in range(setting.steps):  # the round's steps one at a time, so that each one's update is seen
        before = student.weight[0, HONEST_DIMENSIONS:].detach().clone()
        distill_locally(student, data, objective=objective, distill=distill, privacy=config.privacy,
                        noise_multiplier=noise_multiplier, plan=step, seed=config.seed,
                        generator=torch.Generator().manual_seed(config.seed * 1_000_003 + index))
        moved = student.weight[0, HONEST_DIMENSIONS:].detach() - before
        coordinates.append(moved.double().numpy() * setting.expected_batch_size / (lr * clip))
    return np.stack(coordinates)


def likelihood_ratio(coordinates: np.ndarray, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Per canary, log of how much likelier its steps' coordinates are if it was planted: each step
    a mixture, sampled (mean 1) with probability `sample_rate`, against noise alone (mean 0). The
    most powerful score for this mechanism; without noise, how many steps sampled it."""
    if noise_multiplier == 0:
        return coordinates.sum(0)
    shift = (2 * coordinates - 1) / (2 * noise_multiplier ** 2)  # log N(x; 1) / N(x; 0)
    if sample_rate >= 1:
        return shift.sum(0)
    return np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + shift).sum(0)


def audit_step(config: Config, *, canaries: int, out: Path) -> dict:
    """The round with noise and without, every canary's score, the report files."""
    from fedistill.audit import figures, plot, table

    setting = RoundSetting.of(config)
    planted = np.random.default_rng(config.seed).random(canaries) < 0.5
    report = {"step": dataclasses.asdict(setting), "canaries": canaries, "canary": "gradient",
              "planted": int(planted.sum()), "delta": setting.delta, "runs": {}}
    for label, sigma, claim in (("DP", setting.noise_multiplier, setting.accountant_epsilon()),
                                ("no noise", 0.0, math.inf)):
        started = time.perf_counter()
        scores = likelihood_ratio(step_coordinates(setting, config, planted, sigma), setting.sample_rate, sigma)
        report["runs"][label] = {"accountant_epsilon": claim, "seconds": time.perf_counter() - started,
                                 "views": {VIEW: figures(scores, planted, setting.delta)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    (out / "audit.md").write_text(f"{describe(setting)}\n\n{table(report)}\n")
    plot(report, out / "audit.png")
    return report


def describe(setting: RoundSetting) -> str:
    return (f"One round of DP-SGD as a site of {setting.records} records runs it: {setting.steps} steps at sample "
            f"rate {setting.sample_rate:.4g}, normaliser {setting.expected_batch_size}, noise multiplier "
            f"{setting.noise_multiplier:.3f} (the run's epsilon in this one round).")
