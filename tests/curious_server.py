"""Test only: a curious coordinator's ServerApp (tests/test_curious_coordinator.py ships it in place of
the honest one). It sends every site the probes below as a coordinator that wants to learn about
a site's records, files or environment would, and writes each site's replies, with how long each
took, to `$FEDISTILL_RUNS_DIR/curious-<run id>.json`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import payload as P
from common.config import load_config
from common.request import encode, request_of
from common.tasks import build_task

app = ServerApp()

SECRET = "${oc.env:SITE_SECRET}"
ROUNDS = 3


def probes(request: dict, assets: dict) -> dict[str, dict]:
    """name -> the round's config keys it changes (each exploit once: the property test in
    tests/client/test_differential.py sends a thousand more, in-process)."""
    def changed(**keys) -> str:
        return json.dumps({**request, **keys})

    return {
        "interpolated-source": {P.REQUEST: changed(source=SECRET)},
        "config-group-path": {P.REQUEST: changed(task="../../..")},
        "task-name-with-a-path": {P.REQUEST: changed(task="x/../../outside/y")},
        "hydra-override-string": {P.REQUEST: "+privacy@task=../../.. task.source=$\\{oc.env:SITE_SECRET}"},
        "record-paths-and-settings": {P.REQUEST: changed(data_path="/etc/passwd", teacher={"path": "/etc/hostname"},
                                                          corpus={"sites": [["/etc/*"]], "max_records": 1},
                                                          data={"label_column": "rare", "max_length": 4})},
        "wrong-teacher": {P.TEACHER_SHA256: "0" * 64},
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = load_config(["task=digits", f"rounds={ROUNDS}", "distill.local_epochs=1"])
    task = build_task(config)
    student = task.student(config.student)
    assets = P.asset_manifest(task)
    request = json.loads(encode(request_of(config)))
    nodes = wait_for_nodes(grid, 2)
    record = {"nodes": len(nodes), "probes": {}}

    def send(batch: dict[str, dict], server_round: int, copies: int = 1) -> None:
        """Each probe of `batch` to every node (`copies` messages each), all at once; the replies by probe."""
        messages, names = [], []
        for name, changes in batch.items():
            keys = {**assets, P.SERVER_ROUND: server_round, P.ROUNDS_LEFT: ROUNDS - server_round + 1,
                    P.REQUEST: json.dumps(request), **changes}
            for node in nodes:
                for _ in range(copies):
                    messages.append(Message(content=RecordDict({P.ARRAYS: P.model_to_record(student),
                                                                P.CONFIG: ConfigRecord(keys)}),
                                            message_type=MessageType.TRAIN, dst_node_id=node))
                    names.append(name)
        sent = time.time()
        probe_of = dict(zip(grid.push_messages(messages), names))
        waiting, deadline = set(probe_of), time.monotonic() + 600
        while waiting and time.monotonic() < deadline:
            for reply in grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
                record["probes"].setdefault(probe_of[reply.metadata.reply_to_message_id], []).append(
                    reply_record(reply, sent))
            time.sleep(0.5)

    send(probes(request, assets), 1)  # none of these may train: all at once
    send({"train-round-1": {}}, 1)
    send({"round-2-twice-at-once": {}}, 2, copies=2)
    out = Path(os.environ["FEDISTILL_RUNS_DIR"]) / f"curious-{context.run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    deadline = time.monotonic() + 300
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {count} sites connected")
        time.sleep(1)
    return nodes


def reply_record(reply: Message, sent: float) -> dict:
    """What the coordinator sees of one reply: all of it, arrays as their names and shapes."""
    if reply.has_error():
        return {"error": reply.error.reason, "seconds": reply.metadata.created_at - sent}
    content = reply.content
    return {
        "config": {name: dict(record) for name, record in content.config_records.items()},
        "metrics": {name: dict(record) for name, record in content.metric_records.items()},
        "arrays": {name: {k: list(v.shape) for k, v in record.items()} for name, record in content.array_records.items()},
        "seconds": reply.metadata.created_at - sent,
    }
