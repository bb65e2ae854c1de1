"""Baselines for the benchmarks beside the in-process federations of `fedistill.inprocess`: the
non-private students (centralized on all private data). The Flower path itself is timed
separately by `bench/run_bench.py`."""

from __future__ import annotations

import dataclasses
import tempfile

import torch
from torch.utils.data import TensorDataset

from client.dp_train import distill_locally
from common.config import Config, load_config
from common.evaluation import Scores
from common.step_plan import SMALL_BATCH, plan_round
from common.losses import LOGITS
from fedistill.inprocess import evaluator, task_of

def compose(overrides: list[str], cache_dir: str) -> Config:
    return load_config(overrides + [f"cache_dir={cache_dir}", f"run_dir={tempfile.mkdtemp(prefix='fedistill-bench-')}"])


def distill_non_private(config: Config, inputs: torch.Tensor, labels: torch.Tensor | None, epochs: int) -> Scores:
    """A student distilled from the teacher on `inputs` without DP (labels None: soft targets only)."""
    task = task_of(config)
    distill = config.distill
    if labels is None:
        distill = dataclasses.replace(distill, alpha=1.0)
    objective = task.objective(distill)
    targets = task.teacher_targets(inputs, objective.target_kinds)
    if labels is None:
        labels = targets[LOGITS].argmax(-1)
    # Non-private and centralised: the record count is no secret here, so batches of batch_size.
    batch = distill.batch_size or SMALL_BATCH
    distill = dataclasses.replace(distill, local_epochs=epochs, sample_rate=min(1.0, batch / len(inputs)),
                                  batch_size=batch)
    no_dp = dataclasses.replace(config.privacy, enabled=False)
    data = TensorDataset(inputs, labels, *(targets[kind] for kind in objective.target_kinds))
    torch.manual_seed(config.seed)
    student = task.student(config.student)
    distill_locally(student, data, objective=objective, distill=distill, privacy=no_dp, noise_multiplier=None,
                    plan=plan_round(distill, no_dp, len(inputs)), seed=config.seed)
    return evaluator(task)(student)


def centralized(config: Config, epochs: int) -> Scores:
    """The ceiling: non-private distillation on all sites' private data pooled."""
    task = task_of(config)
    parts = [task.private_data(i, config.sites).tensors for i in range(config.sites)]
    return distill_non_private(config, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), epochs)
