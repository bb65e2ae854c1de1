"""A run's state after each round, on the coordinator's disk, so that a run whose coordinator died
goes on from its last complete round (`resume=<run_dir>`).

After round r the run directory holds `checkpoints/round-r.safetensors` (the global student),
`checkpoints/round-r.server.safetensors` (torch's global RNG and, in the logits exchange, the
consensus) and, written last, `checkpoints/state.json`, which names r: a crash at any point
leaves the previous round's state whole. Rounds not run because the run had stopped
(federation.max_failed_rounds) are not saved, so that a resumed run runs them. Every other draw the server makes is seeded by the
run's seed and the round (the participation plan, server-side distillation's batches), and
the sites' by the seed, the round and the site, so a seeded run without DP resumed from round
r ends where the uninterrupted run ends (two things it cannot restore: with
exchange.broadcast=logits the sites' own students, which Flower keeps per run, start again
from the consensus; in simulation the new run's node ids differ, so with fraction_train below
1 the participation plan is drawn again). The sites' privacy is not in this state: each
site's ledger has recorded every release, including one the coordinator never received.
Everything is fsynced: the state must survive the machine, not only the process.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model

from common.config import ConfigError
from common.storage import atomic_write, save_tensors
from server.report import PrivacyView
from server.rundir import STATE_FILE, server_checkpoint, student_checkpoint
from server.rounds import RoundEngine

VERSION = 1
RNG = "torch_rng"
CONSENSUS = "consensus."


@dataclass
class Progress:
    """What the run has done and reports: its round records, what the server learnt of each
    site's privacy, the dropped replies by reason, the global student's last scores and the
    Flower runs it took (more than one once resumed)."""

    rounds: list[dict] = field(default_factory=list)
    privacy: PrivacyView = field(default_factory=PrivacyView)
    dropped: Counter = field(default_factory=Counter)
    scores: dict | None = None
    runs: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"rounds": self.rounds, "privacy": vars(self.privacy), "dropped": dict(self.dropped),
                "scores": self.scores, "runs": self.runs}

    @classmethod
    def from_json(cls, saved: dict) -> Progress:
        privacy = PrivacyView()
        vars(privacy).update(saved["privacy"])
        return cls(rounds=saved["rounds"], privacy=privacy, dropped=Counter(saved["dropped"]),
                   scores=saved["scores"], runs=saved["runs"])


def _unquoted(value: str) -> str:
    return json.loads(value) if value.startswith('"') else value


def save(run_dir: Path, server_round: int, *, overrides: list[str], engine: RoundEngine, progress: Progress) -> None:
    """Everything a resumed run needs after `server_round`; state.json last, as the commit."""
    tensors = {RNG: torch.get_rng_state()}
    tensors |= {CONSENSUS + name: t for name, t in engine.exchange.state_dict().items()}
    save_tensors(server_checkpoint(run_dir, server_round), tensors, durable=True)
    plan = engine.plan
    state = {
        "version": VERSION,
        "round": server_round,
        "overrides": overrides,
        "plan": {"nodes": plan.nodes, "sampled": {str(r): nodes for r, nodes in plan.sampled.items()}},
        "progress": progress.to_json(),
    }
    atomic_write(run_dir / STATE_FILE, json.dumps(state, indent=1).encode(), durable=True)  # Infinity: no DP


@dataclass
class SavedRun:
    """A run directory's state, read back."""

    run_dir: Path
    round: int
    overrides: list[str]
    state: dict

    @classmethod
    def read(cls, run_dir: Path | str) -> SavedRun:
        run_dir = Path(run_dir)
        path = run_dir / STATE_FILE
        if not path.exists():
            raise ConfigError(f"resume={run_dir}: {path} does not exist. resume takes the run directory of a run that "
                              "completed at least its warm start (its checkpoints/ hold a state.json)")
        try:
            state = json.loads(path.read_text())
            if state.get("version") != VERSION:
                raise ValueError(f"version {state.get('version')!r}, this fedistill reads {VERSION}")
            overrides = [str(o) for o in state["overrides"]]
            server_round = int(state["round"])
            Progress.from_json(state["progress"])
            if not isinstance(state["plan"], dict):
                raise TypeError("the plan is not a mapping")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"resume={run_dir}: {path} cannot be read ({err}); it is written by the run itself, "
                              "so restore it from a backup or start a new run") from None
        return cls(run_dir, server_round, overrides, state)

    def overrides_for(self, given: list[str]) -> list[str]:
        """The run's own overrides with `resume` and `run_dir` pinned to this directory. An override
        given with resume= that is not the run's own is refused: it would change the run midway. A
        run directory moved since is refused: the sites' ledgers of a simulation are kept in it, and
        a site that found none where the run says would start a new one at epsilon 0."""
        def key(override: str) -> str:
            return override.split("=", 1)[0].lstrip("+~")

        kept = [o for o in self.overrides if key(o) not in ("resume", "run_dir")]
        other = [o for o in given if key(o) not in ("resume", "run_dir") and o not in kept]
        if other:
            raise ConfigError(f"resume= continues the run as it was configured ({' '.join(kept) or 'defaults'}); "
                              f"{' '.join(other)} would change it midway: give resume= alone")
        saved = [_unquoted(o.split("=", 1)[1]) for o in self.overrides if key(o) == "run_dir"]
        if saved and Path(saved[-1]).resolve() != self.run_dir.resolve():
            raise ConfigError(f"resume={self.run_dir}: the run was made in {saved[-1]} and has been moved; move it back "
                              "before resuming (the sites' ledgers and the run's files are named by that path)")
        return [*kept, f"run_dir={json.dumps(str(self.run_dir))}", f"resume={json.dumps(str(self.run_dir))}"]

    def check_rounds_left(self, rounds: int) -> None:
        if self.round >= rounds:
            raise ConfigError(f"resume={self.run_dir}: the run already completed all its {rounds} rounds; its results "
                              "are in that folder (start a new run for more rounds)")

    def progress(self) -> Progress:
        return Progress.from_json(self.state["progress"])

    def restore(self, engine: RoundEngine) -> None:
        """The global student, the plan, the exchange's state and torch's RNG as they were after the
        saved round. The count of failed rounds in a row starts again: resuming is another try."""
        load_model(engine.global_student, str(student_checkpoint(self.run_dir, self.round)))
        tensors = load_file(str(server_checkpoint(self.run_dir, self.round)))
        torch.set_rng_state(tensors.pop(RNG))
        engine.exchange.load_state_dict({name.removeprefix(CONSENSUS): t for name, t in tensors.items()})
        plan = self.state["plan"]
        engine.plan.nodes = [int(n) for n in plan["nodes"]]
        engine.plan.sampled = {int(r): [int(n) for n in nodes] for r, nodes in plan["sampled"].items()}

