"""End to end: the logits exchange on real Flower processes, with honest sites and with sites
whose replies are malformed (a ClientApp that corrupts them); the float16 wire size in-process
(the same site round and server exchange, without Flower's processes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.config import load_config
from fedistill.inprocess import federate
from fedistill.processes import processes_using
from tests.test_simulate import RUN_FILES, simulate

pytestmark = pytest.mark.e2e  # real Flower simulations


LOGITS_TOPK = ["exchange=logits", "exchange.broadcast=logits", "exchange.compression=topk",
               "exchange.site_students=[{hidden:[16]},{hidden:[32]},{hidden:[16,16]}]"]
LOGITS_FLOAT16 = ["exchange=logits", "exchange.compression=float16"]
PUBLIC_ROWS = 90  # 5% of digits' 1,797 images


def federation(cache_dir) -> list[str]:
    return ["task=digits", "sites=3", "rounds=2", f"cache_dir={cache_dir}", "exchange.server.epochs=20"]


def check_bytes_up(per_site: float, extra: list[str]) -> None:
    """Each site sends its public rows' log-probabilities and nothing more: 10 float16 per row, or the
    top 3 as float16 values and 16-bit indices."""
    payload, arrays = (PUBLIC_ROWS * 10 * 2, 1) if "exchange.compression=float16" in extra else (PUBLIC_ROWS * 3 * (2 + 2), 2)
    assert payload <= per_site <= payload + 128 * arrays  # each array also carries a small .npy header


def test_logits_exchange_runs_end_to_end_with_the_same_run_files(tmp_path, cache_dir):
    """Sites of three student shapes, their students kept by Flower between rounds."""
    run_dir = tmp_path / "run"
    result = simulate(run_dir, *federation(cache_dir), *LOGITS_TOPK)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in RUN_FILES:
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exchange"] == "logits" and summary["rounds_completed"] == 2
    check_bytes_up(summary["communication"]["bytes_up_per_site_round"], LOGITS_TOPK)
    assert "log-probabilities on the public inputs" in (run_dir / "privacy.md").read_text()


def test_float16_logits_with_the_weights_broadcast_cost_their_size_on_the_wire(tmp_path, cache_dir):
    config = load_config([*federation(cache_dir), *LOGITS_FLOAT16, f"run_dir={tmp_path / 'run'}"])
    _, wire = federate(config, dp_seed=0)
    check_bytes_up(wire["bytes_up_per_site_round"], LOGITS_FLOAT16)


FAULTY_CLIENT = '''
"""Test only: the honest ClientApp, but sites 1-4 corrupt their logits before replying."""
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

import client.app as honest
from common import payload as P

app = ClientApp()


@app.train()
def train(msg, context):
    reply = honest.train(msg, context)
    site = int(context.node_config["partition-id"])
    if site == 0:
        return reply
    logits = reply.content[P.LOGITS]["logits"].numpy()
    bad = {
        1: np.full_like(logits, np.nan),
        2: np.full_like(logits, np.inf),
        3: logits[:-1],
        4: np.zeros((len(logits) * 40, logits.shape[1]), dtype=np.float32),
    }[site]
    reply.content[P.LOGITS] = ArrayRecord({"logits": Array(bad)})
    return reply
'''


def test_bad_replies_are_dropped_and_counted_while_the_run_completes(tmp_path, cache_dir, write_policy):
    from common.policy import POLICY_ENV
    from fedistill.cli import APP_DIR, resolve_paths, write_run_config
    from fedistill.simulation import SimulationSuperLink

    app_dir = tmp_path / "app"
    for part in ("common", "server", "client", "conf"):
        shutil.copytree(APP_DIR / part, app_dir / part, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (APP_DIR / "pyproject.toml").read_text().replace('"client.app:app"', '"faulty_client:app"')
    pyproject = pyproject.replace('"client/**/*.py",', '"client/**/*.py", "faulty_client.py",')
    (app_dir / "pyproject.toml").write_text(pyproject)
    (app_dir / "faulty_client.py").write_text(FAULTY_CLIENT)
    overrides, config = resolve_paths(["task=digits", "sites=5", "rounds=1", "exchange=logits",
                                       "exchange.max_reply_mb=0.05", "exchange.server.epochs=5",
                                       f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}"])
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    try:
        policy = write_policy(tmp_path / "site.yaml", ledger_dir=str(tmp_path / "ledger"))
        with SimulationSuperLink(run_dir, env={POLICY_ENV: str(policy)}) as link:
            code = link.run(app_dir, write_run_config(run_dir, overrides), num_supernodes=5, cpus_per_site=2, echo=lambda line: None)
    finally:
        leftovers = processes_using(run_dir)
        for proc in leftovers:
            proc.kill()
    assert code == 0 and not leftovers
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    dropped = summary["dropped_replies"]  # by reason, not site by site
    assert sum(dropped.values()) == 4 and all(reason.startswith("invalid: ") for reason in dropped), dropped
    assert not any(f"site-{n}" in reason for reason in dropped for n in range(5))
    [round_one] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert round_one["sites_trained"] == 1 and round_one["sites_invalid"] == 4
    reasons = {p["site"]: p["reason"] for p in round_one["problems"]}
    assert "NaN or infinite" in reasons["site-1"] and "NaN or infinite" in reasons["site-2"]
    assert "expected float32[90, 10]" in reasons["site-3"]
    assert "exceeds the limit" in reasons["site-4"]
    assert 0 < summary["student"]["accuracy"] <= 1
