"""Flower's FedAvg, unchanged, on the fedistill run's student, scored on the task's test set after
every round; each round's end time goes to the `timings` file for bench/scale_bench.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from common.config import load_config
from common.tasks import build_task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = load_config(str(context.run_config["overrides"]))
    task = build_task(config)
    evaluate = task.evaluator()
    torch.manual_seed(config.seed)
    student = task.student(config.student)
    timings, round_ends = Path(str(context.run_config["timings"])), []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        student.load_state_dict(arrays.to_torch_state_dict())
        scores = evaluate(student)
        round_ends.append(time.time())
        timings.write_text(json.dumps({"round_ends": round_ends, "scores": scores}))
        return MetricRecord(scores)

    strategy = FedAvg(fraction_train=config.federation.fraction_train, fraction_evaluate=0.0,
                      min_available_nodes=config.federation.min_sites, min_train_nodes=config.federation.min_sites)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(student.state_dict()), num_rounds=config.rounds,
                   timeout=config.federation.round_timeout, evaluate_fn=evaluate_fn)
