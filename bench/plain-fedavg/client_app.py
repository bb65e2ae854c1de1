"""A site of plain FedAvg: the fedistill run's shard of the task's data and its student, trained
with SGD on cross-entropy for the steps of the run's step plan; no teacher, DP, ledger or policy."""

from __future__ import annotations

import functools

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.nn import functional as F
from torch.utils.data import DataLoader

from common.config import Config, load_config
from common.step_plan import plan_round, size_class
from common.tasks import Task, build_task

app = ClientApp()


@functools.lru_cache(maxsize=1)
def run_task(overrides: str) -> tuple[Config, Task]:
    config = load_config(overrides)
    return config, build_task(config)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, task = run_task(str(context.run_config["overrides"]))
    data = task.private_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    student = task.student(config.student)
    student.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    plan = plan_round(config.distill, config.privacy, size_class(len(data)))  # as a fedistill site plans
    optimizer = torch.optim.SGD(student.parameters(), lr=plan.lr)
    batches = DataLoader(data, batch_size=plan.expected_batch_size, shuffle=True)
    steps = 0
    while steps < plan.steps:
        for inputs, labels in batches:
            optimizer.zero_grad()
            F.cross_entropy(student(inputs), labels).backward()
            optimizer.step()
            steps += 1
            if steps == plan.steps:
                break
    content = RecordDict({"arrays": ArrayRecord(student.state_dict()), "metrics": MetricRecord({"num-examples": len(data)})})
    return Message(content=content, reply_to=msg)
