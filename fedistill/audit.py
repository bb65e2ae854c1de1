"""`fedistill audit`: check the accountant's epsilon from outside, with canaries and one run each
with and without DP (Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run", 2023).

Canaries are the task's kind: for a classifier, held-out records with a wrong label
(mislabelled images, texts or rows); for a causal LM (task=lm), generated code lines, each
unique by the random words of the string it assigns. Each is planted in site 0's private records with
probability 1/2 (a seeded draw); the others are held back. The same federation then runs twice
on the same seed, with the run's DP and without DP (`fedistill.inprocess`: the apps' own round
and exchange). An observer scores every canary on what it sees: the final global student and,
in the weights exchange, every student site 0 sent. The score is how much more likely the
canary's wrong label (a code line's tokens) is under the observed student than under the warm-start student, which no
site's record touched (for the site's replies: than under the student it was sent that round,
summed over rounds); and, white-box, how far the step from the one to the other goes down the
gradient of the site's training loss on the canary (gradient alignment). From the planted and held-back scores: attack AUC,
TPR at 1% FPR, and the one-run lower bound on epsilon at 95% confidence (guessing "planted"
for the top 2, 5, 10, 20, 30 or 50% of the canaries by score, with a Bonferroni correction
over those six cut-offs), beside the
epsilon site 0's ledger spent. A DP run whose bound exceeds the accountant's epsilon would
show the accounting (or the mechanism, such as DP-SGD's fixed normaliser) leaks more than it
says.

Writes audit.json, audit.md and audit.png (score histograms of planted and held-back canaries,
with and without DP) to its folder.
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import json
import keyword
import math
import random
import time
from functools import cached_property
from pathlib import Path

import numpy as np

from common.config import Config, ConfigError, load_config
from fedistill import step_audit

CANARIES = 200
CANARY_KINDS = {"classifier": ("mislabelled", "shuffled"), "lm": ("unique-lines",)}  # the first: the task's default
# A code line's secret: words drawn from Python's own, each a common token of code, so that a
# student learns which follows which in a planted line (a string of random characters teaches
# only that random characters follow, planted or not: no membership signal even without DP)
SECRET_WORDS = tuple(sorted(set(keyword.kwlist) | {n for n in dir(builtins) if n.islower() and not n.startswith("_")}))
SECRET_LENGTH = 12
NAMES = ("cache", "token", "session", "user", "config", "buffer", "queue", "socket", "record", "parser", "handler",
         "client", "account", "backup", "device", "service")
SCORED_AT_ONCE = 16  # canaries per forward pass: a causal LM's logits for many records at once fill the memory
SIGNIFICANCE = 0.05
AUDITED_SITE = 0
FPR = 0.01
GUESS_SHARES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # the auditor's cut-offs, as shares of the canaries
GLOBAL, REPLIES = "global student", f"site {AUDITED_SITE}'s replies"
GLOBAL_STEP, REPLIES_STEP = "global student, gradient alignment", f"site {AUDITED_SITE}'s updates, gradient alignment"


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "audit", help="plant canaries at one site and check the accountant's epsilon from outside",
        description="Plant canary records in site 0's private data, run the federation with and without "
                    "DP on the same seed, and attack the released students with a membership score. Reports "
                    "attack AUC, TPR at 1%% FPR and a one-run empirical lower bound on epsilon beside the "
                    "accountant's, with a plot; writes audit.json, audit.md and audit.png to run_dir. Arguments "
                    "are Hydra overrides as for simulate. Two federations: about 1 minute for task=digits and 4 "
                    "minutes for the default MNIST on a 2-core CPU, longer for text; about 7 minutes for task=lm. "
                    "--step audits the sites' DP-SGD itself instead: one round with gradient canaries, seconds.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value), e.g. task=digits privacy.epsilon=8")
    parser.add_argument("--canaries", type=int, help=f"canaries, each planted with probability 1/2 (default {CANARIES}; "
                                                     f"{step_audit.CANARIES} with --step)")
    parser.add_argument("--canary", choices=[kind for kinds in CANARY_KINDS.values() for kind in kinds],
                        help="classifiers: mislabelled (held-out records with a wrong label, the default) or shuffled "
                             "(their features also shuffled: out of distribution, so that their gradients stand out, "
                             "a stronger audit); task=lm: unique-lines (generated code lines, each with a random "
                             f"string of {SECRET_LENGTH} random Python words)")
    parser.add_argument("--step", action="store_true",
                        help="audit one round of the sites' DP-SGD (Opacus, the step plan, the fixed normaliser) with "
                             "gradient canaries, each in a coordinate of its own, against the accountant's epsilon "
                             "for that round; no federation")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedistill.frontier import output_folder

    out = output_folder(args.overrides, "audit")
    if args.step:
        if args.canary is not None:
            raise ConfigError(f"--step plants gradient canaries, not --canary {args.canary}: leave --canary out")
        report = step_audit.audit_step(load_config([*args.overrides, f"run_dir={out}"]),
                                       canaries=args.canaries or step_audit.CANARIES, out=out)
        print(step_audit.describe(step_audit.RoundSetting(**report["step"])))
    else:
        report = audit(args.overrides, canaries=args.canaries or CANARIES, kind=args.canary, out=out)
    print(table(report))
    print(f"fedistill: the audit in {out} (audit.md, audit.json, audit.png)")
    return 0


# --- the bound ---
# scipy is imported where it is used: `fedistill` builds every command's parser from this module,
# and `fedistill status` should not wait a second for scipy.

def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The chance that an (epsilon, delta)-DP run lets `guesses` guesses about m canaries get at
    least `correct` right (Steinke et al. 2023, Theorem 3.3 with its delta term)."""
    from scipy import special, stats

    q = special.expit(epsilon)
    beta = stats.binom.sf(correct - 1, guesses, q)
    if delta == 0:
        return beta
    shortfall = np.arange(1, correct + 1)
    alpha = np.max((stats.binom.sf(correct - shortfall - 1, guesses, q) - beta) / shortfall, initial=0)
    return min(beta + alpha * delta * 2 * m, 1.0)


def cut_offs(m: int) -> list[int]:
    """How many top-scoring canaries the auditor guesses "planted": GUESS_SHARES of m, fixed before
    any score is seen (few, so that the Bonferroni correction over them stays mild)."""
    return sorted({max(1, round(share * m)) for share in GUESS_SHARES})


def epsilon_lower_bound(planted: np.ndarray, held_back: np.ndarray, *, delta: float,
                        significance: float = SIGNIFICANCE) -> float:
    """The largest epsilon that guessing "planted" for the r top-scoring canaries rejects at
    `significance`, over the cut-offs r (Bonferroni: each tested at significance / their number)."""
    from scipy import optimize, special

    m = len(planted) + len(held_back)
    is_planted = np.concatenate([np.ones(len(planted), bool), np.zeros(len(held_back), bool)])
    order = np.argsort(-np.concatenate([planted, held_back]), kind="stable")
    correct_at = np.cumsum(is_planted[order])
    tried = cut_offs(m)
    level, best = significance / len(tried), 0.0
    for guesses in tried:
        correct = int(correct_at[guesses - 1])
        if correct / guesses <= special.expit(best) or p_value(m, guesses, correct, best, delta) > level:
            continue
        high = max(1.0, 2 * best)
        while p_value(m, guesses, correct, high, delta) <= level:
            high *= 2
        best = optimize.brentq(lambda eps: level - p_value(m, guesses, correct, eps, delta), best, high, xtol=1e-6)
    return best


def auc(planted: np.ndarray, held_back: np.ndarray) -> float:
    """The chance a planted canary scores above a held-back one (ties count half)."""
    from scipy import stats

    return float(stats.mannwhitneyu(planted, held_back).statistic / (len(planted) * len(held_back)))


def tpr_at_fpr(planted: np.ndarray, held_back: np.ndarray, fpr: float = FPR) -> float:
    """The share of planted canaries above the highest threshold that lets at most `fpr` of the
    held-back ones through."""
    allowed = math.floor(fpr * len(held_back))
    threshold = np.sort(held_back)[::-1][allowed] if allowed < len(held_back) else -np.inf
    return float(np.mean(planted > threshold))


# --- the runs ---

@dataclasses.dataclass(frozen=True)
class Canaries:
    inputs: "torch.Tensor"  # noqa: F821 (torch loads only when an audit runs)
    labels: "torch.Tensor"  # noqa: F821 the wrong labels, or a code line's next tokens
    planted: np.ndarray     # bool per canary

    @staticmethod
    def draw(task, count: int, seed: int, kind: str = "mislabelled") -> "Canaries":
        """`count` canaries of `kind`, each planted with probability 1/2."""
        planted = np.random.default_rng(seed).random(count) < 0.5
        if kind == "unique-lines":
            inputs, labels = task.text_records(unique_lines(count, seed)).tensors
            return Canaries(inputs, labels, planted)
        return Canaries(*mislabelled(task, count, seed, shuffled=kind == "shuffled"), planted)

    def scores(self, student, reference) -> np.ndarray:
        """Per canary: log p(its wrong label, or its line's tokens) under `student` minus under `reference`."""
        import torch

        student.eval()
        reference.eval()
        with torch.no_grad():
            parts = [label_log_likelihood(student, x, y) - label_log_likelihood(reference, x, y)
                     for x, y in zip(self.inputs.split(SCORED_AT_ONCE), self.labels.split(SCORED_AT_ONCE))]
        return torch.cat(parts).double().numpy()

    def alignment(self, before, after, loss) -> np.ndarray:
        """Per canary: how far the step from `before` to `after` goes down the canary's own
        gradient of `loss(model, canary index)` at `before` (the site's training loss on it),
        <before - after, g / |g|>. The white-box view of an update: a planted canary's (clipped)
        gradient is in it, beside the others' and the noise."""
        import torch

        params = [p for p in before.parameters() if p.requires_grad]
        moved = [p for p in after.parameters() if p.requires_grad]
        step = torch.cat([(b - a).detach().flatten() for b, a in zip(params, moved)])
        before.eval()
        scores = []
        for i in range(len(self.labels)):
            gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss(before, i), params)])
            scores.append(float(step @ gradient / gradient.norm().clamp(min=1e-12)))
        return np.array(scores)


def mislabelled(task, count: int, seed: int, *, shuffled: bool):
    """`count` of a classifier's held-out records (inputs, wrong labels); `shuffled`: each
    record's features also put in a random order (an image's pixels, a text's tokens), so that
    no honest record's gradient resembles the canary's."""
    import torch

    inputs, labels = task.test_data().tensors[:2]
    if count > len(inputs) // 2:
        raise ConfigError(f"--canaries {count} is more than half of task={task.name}'s {len(inputs)} held-out "
                          f"records, which also score the students: use at most {len(inputs) // 2}")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(inputs), generator=generator)[:count]
    shift = torch.randint(1, task.num_classes, (count,), generator=generator)
    canaries = inputs[chosen]
    if shuffled:
        flat = canaries.reshape(count, -1)
        order = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(count)])
        canaries = flat.gather(1, order).reshape(canaries.shape)
    return canaries, (labels[chosen] + shift) % task.num_classes


def unique_lines(count: int, seed: int) -> list[str]:
    """Code lines that assign a string of random Python words to a plausible name: unique (about 110^12
    strings), so that only a student trained on a line can find its words' order likely."""
    rng = random.Random(seed)
    return [f'{rng.choice(NAMES)}_{rng.choice(NAMES)}_key = "{" ".join(rng.choices(SECRET_WORDS, k=SECRET_LENGTH))}"\n'
            for _ in range(count)]


def label_log_likelihood(model, inputs, labels):
    """Per record, log p(labels) under `model`: a classifier's label, or a causal LM's next tokens
    summed over the record (positions without one, -100, left out)."""
    import torch

    from common.losses import attention_mask

    if labels.dim() == 1:
        return torch.log_softmax(model(inputs), 1).gather(1, labels[:, None])[:, 0]
    log_p = torch.log_softmax(model(inputs, attention_mask=attention_mask(labels)), -1)
    return log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(labels == -100, 0.0).sum(1)


def canary_kind(task_kind: str, asked: str | None) -> str:
    """The canary kind to plant: the one asked for if it fits the task, else the task's default."""
    kinds = CANARY_KINDS["lm" if task_kind == "lm" else "classifier"]
    if asked is None:
        return kinds[0]
    if asked not in kinds:
        raise ConfigError(f"--canary {asked} does not fit task kind {task_kind}: choose {' or '.join(kinds)}")
    return asked


def planted_site(site, canaries: Canaries):
    """`site` with the planted canaries added to its records (nothing else of it changes)."""
    import torch
    from torch.utils.data import TensorDataset

    from client.site import Site

    class PlantedSite(Site):
        @cached_property
        def records(self) -> TensorDataset:
            inputs, labels = Site.records.func(self).tensors[:2]
            keep = torch.from_numpy(canaries.planted)
            return TensorDataset(torch.cat([inputs, canaries.inputs[keep]]), torch.cat([labels, canaries.labels[keep]]))

    return PlantedSite(**{field.name: getattr(site, field.name) for field in dataclasses.fields(Site)})


def observe(config: Config, canaries: Canaries) -> dict:
    """One federation with site 0's canaries planted: each view's canary scores, and site 0's spend."""
    import copy

    from common import payload as P
    from fedistill.inprocess import federate, sites_of, start_of

    sites = sites_of(config)
    sites[AUDITED_SITE] = planted_site(sites[AUDITED_SITE], canaries)
    objective = sites[AUDITED_SITE].objective  # the site's own loss, teacher's targets and all
    targets = sites[AUDITED_SITE].task.teacher_targets(canaries.inputs, objective.target_kinds)

    def site_loss(model, i: int):
        one = slice(i, i + 1)
        return objective(model, canaries.inputs[one], canaries.labels[one], {k: t[one] for k, t in targets.items()})

    reference = start_of(config)[0]
    sent, received = copy.deepcopy(reference), copy.deepcopy(reference)
    views: dict[str, np.ndarray] = {}
    # logits exchange: the coordinator rebuilds site 0's student from its rows alone (the server's
    # own fit, with no teacher mixed in), from the warm-start student
    alone = dataclasses.replace(config.exchange, teacher_weight=0.0, choose_teacher_weight=False)
    rows_of_site = sites[AUDITED_SITE].task.public_outputs(alone) if config.exchange.mode == "logits" else None

    def add(view: str, scores: np.ndarray) -> None:  # summed over rounds
        views[view] = views.get(view, 0) + scores

    def score_reply(node: int, content, reply) -> None:
        # each round's reply against the student the site started that round from: what the
        # coordinator sees of the site, every round's step on its records
        if node != AUDITED_SITE or reply[P.CONFIG][P.STATUS] != P.STATUS_OK:
            return
        if P.ARRAYS in reply.array_records:
            P.load_record(sent, reply[P.ARRAYS])
            P.load_record(received, content[P.ARRAYS])
        elif rows_of_site is not None and P.LOGITS in reply.array_records:
            targets, _ = rows_of_site.combine([{k: v.numpy() for k, v in reply[P.LOGITS].items()}], np.ones(1),
                                              lambda stack, weights: stack[0])
            sent.load_state_dict(reference.state_dict())
            rows_of_site.fit(sent, targets, config.exchange.server, seed=config.seed)
            received.load_state_dict(reference.state_dict())
        else:
            return
        add(REPLIES, canaries.scores(sent, received))
        add(REPLIES_STEP, canaries.alignment(received, sent, site_loss))

    def score_global(task, student) -> dict:
        views[GLOBAL] = canaries.scores(student, reference)
        views[GLOBAL_STEP] = canaries.alignment(reference, student, site_loss)
        return {}

    _, wire = federate(config, sites=sites, on_reply=score_reply, also=score_global)
    spent = wire["epsilon_by_site"][sites[AUDITED_SITE].name]
    return {"views": views, "epsilon": spent if config.privacy.enabled else math.inf}


def audit(overrides: list[str], *, canaries: int, out: Path, kind: str | None = None) -> dict:
    """Both runs, every view's figures, the report files."""
    from fedistill.inprocess import task_of

    out.mkdir(parents=True, exist_ok=True)
    private = load_config([*overrides, f"run_dir={out / 'dp'}"])
    if not private.privacy.enabled:
        raise ConfigError("fedistill audit runs the federation with and without DP itself: leave privacy=dp and set "
                          "privacy.epsilon to the budget to audit")
    kind = canary_kind(private.task.kind, kind)
    task = task_of(private)
    planted = Canaries.draw(task, canaries, private.seed, kind)
    report = {"overrides": overrides, "canaries": canaries, "canary": kind, "planted": int(planted.planted.sum()),
              "significance": SIGNIFICANCE, "delta": private.privacy.delta, "runs": {}}
    for label, config in (("DP", private), ("no DP", load_config([*overrides, "privacy=none", f"run_dir={out / 'no-dp'}"]))):
        started = time.perf_counter()
        seen = observe(config, planted)
        report["runs"][label] = {"accountant_epsilon": seen["epsilon"], "seconds": time.perf_counter() - started,
                                 "views": {view: figures(scores, planted.planted, private.privacy.delta)
                                           for view, scores in seen["views"].items()}}
        print(f"fedistill audit: {label} run done ({time.perf_counter() - started:.0f} s)", flush=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    (out / "audit.md").write_text(table(report) + "\n")
    plot(report, out / "audit.png")
    return report


def figures(scores: np.ndarray, planted: np.ndarray, delta: float) -> dict:
    inside, outside = scores[planted], scores[~planted]
    return {"auc": auc(inside, outside), "tpr_at_1pct_fpr": tpr_at_fpr(inside, outside),
            "epsilon_lower_bound": epsilon_lower_bound(inside, outside, delta=delta),
            "planted_scores": inside.tolist(), "held_back_scores": outside.tolist()}


def table(report: dict) -> str:
    lines = ["| run | view | attack AUC | TPR at 1% FPR | epsilon lower bound (95%) | accountant's epsilon |",
             "|---|---|---|---|---|---|"]
    for label, run_ in report["runs"].items():
        for view, f in run_["views"].items():
            accountant = "none (no DP)" if math.isinf(run_["accountant_epsilon"]) else f"{run_['accountant_epsilon']:.2f}"
            lines.append(f"| {label} | {view} | {f['auc']:.3f} | {f['tpr_at_1pct_fpr']:.3f} | "
                         f"{f['epsilon_lower_bound']:.2f} | {accountant} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, view, f) for label, run_ in report["runs"].items() for view, f in run_["views"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (label, view, f) in zip(axes[0], panels):
        both = f["planted_scores"] + f["held_back_scores"]
        bins = np.linspace(min(both), max(both), 25) if max(both) > min(both) else 10
        ax.hist(f["held_back_scores"], bins=bins, alpha=0.6, label="held back")
        ax.hist(f["planted_scores"], bins=bins, alpha=0.6, label="planted")
        ax.set_title(f"{label}: {view}\nAUC {f['auc']:.2f}, eps >= {f['epsilon_lower_bound']:.2f}", fontsize=9)
        ax.set_xlabel("canary score (log-likelihood ratio)")
    axes[0][0].set_ylabel("canaries")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
