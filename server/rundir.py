"""The run directory: every file a run leaves behind, written as the run goes."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
import torch
from torch import nn

from common.config import Config
from common.evaluation import Metric, Scores
from common.storage import atomic_write, jsonable, save_model, write_json

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PRIVACY_FILE = "privacy.json"
PRIVACY_REPORT = "privacy.md"
STUDENT_INT8 = "student-int8.pt"  # beside the task's export (see Task.export)
PLOT_FILE = "progress.png"
STATE_FILE = "checkpoints/state.json"  # server.resume's, written after each round


def student_checkpoint(run_dir: Path, server_round: int) -> Path:
    """The global student after `server_round` (0: the one the run started from)."""
    return run_dir / f"checkpoints/round-{server_round:03d}.safetensors"


def server_checkpoint(run_dir: Path, server_round: int) -> Path:
    """The server's own tensors after `server_round` (server.resume)."""
    return run_dir / f"checkpoints/round-{server_round:03d}.server.safetensors"


class RunDirectory:
    def __init__(self, path: Path | str, config: Config):
        self.path = Path(path)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_yaml(OmegaConf.structured(config))
        atomic_write(self.path / CONFIG_FILE, resolved.encode())

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text.encode())

    def log_round(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")

    def rewrite_rounds(self, records: list[dict[str, Any]]) -> None:
        """metrics.jsonl holding exactly `records` (a resumed run drops what came after its saved round)."""
        atomic_write(self.path / METRICS_FILE, "".join(json.dumps(jsonable(r)) + "\n" for r in records).encode())

    def save_model(self, name: str, model: nn.Module) -> Path:
        return save_model(self.path / name, model)

    def save_int8(self, model: nn.Module) -> None:
        """An int8 model's state_dict (packed weights, which safetensors cannot hold): load it into
        common.models.inference.quantize_int8 of the exported student."""
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        atomic_write(self.path / STUDENT_INT8, buffer.getvalue())

    def save_checkpoint(self, server_round: int, model: nn.Module) -> Path:
        """Synced to disk: a resumed run reads it after a crash of the machine (server.resume)."""
        return save_model(student_checkpoint(self.path, server_round), model, durable=True)

    def plot(self, rounds: list[dict[str, Any]], *, metrics: tuple[Metric, ...], teacher: Scores,
             budgets: dict[str, float]) -> None:
        """The headline metric (and agreement with the teacher) and epsilon by round, side by side."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (acc_ax, eps_ax) = plt.subplots(1, 2, figsize=(10, 4))
        xs = [r["round"] for r in rounds]
        headline = metrics[0]
        acc_ax.plot(xs, [r[headline.name] for r in rounds], marker="o", label="global student")
        if headline.unit_interval and any(m.name == "agreement" for m in metrics):
            acc_ax.plot(xs, [r["agreement"] for r in rounds], marker=".", linestyle=":", label="agreement with teacher")
        acc_ax.axhline(teacher[headline.name], color="gray", linestyle="--", label="teacher")
        acc_ax.set(xlabel="round", ylabel=headline.label, title="Global student")
        if headline.unit_interval:
            acc_ax.set_ylim(0, 1)
        else:
            acc_ax.set_yscale("log")
        acc_ax.legend(loc="lower right" if headline.higher_is_better else "upper right")
        sites = sorted({s for r in rounds for s in r["epsilon"]})
        for site in sites:
            eps_ax.plot(xs, [r["epsilon"].get(site) for r in rounds], marker="o", label=site)
        finite = [b for b in budgets.values() if math.isfinite(b)]
        if finite:
            eps_ax.axhline(max(finite), color="red", linestyle="--", label="budget")
        eps_ax.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per site")
        if sites:
            eps_ax.legend(loc="upper left", fontsize="small")
        fig.tight_layout()
        fig.savefig(self.path / PLOT_FILE, dpi=100)
        plt.close(fig)
