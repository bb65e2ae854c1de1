"""`fedistill site-check --config site.yaml`: is this site ready to join the federation?

A partner runs it before `fedistill site`. It reads the site file and checks, in order: the
file itself, the task and the site's records, the teacher and public set against the file's
pins, the privacy ledger, the certificate and key, and that the coordinator answers. Each
line says ok, warn or FAIL; a line that is not ok says how to fix it. The exit code is 0
only when nothing failed.

It changes nothing: the ledger is only read, no teacher is fitted, and the only machine it
connects to is the coordinator named in the site file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torch.utils.data import TensorDataset

from common import payload as P
from common.config import ConfigError
from common.policy import SitePolicy, load_policy
from common.privacy import LEDGER_FILE, Budget, LedgerError, PrivacyLedger, file_records
from common.site_config import available_tasks, read_records, site_task_config
from common.tasks import Task, build_task
from fedistill.check_report import FAIL, OK, WARN, Check, format_report, message
from fedistill.connection_check import check_certificates_and_coordinator

DEFAULT_SITE_NAME = "site-0"  # the ledger folder of a site whose file names none
CUSTOM_TASK = "custom"  # the task name a package.module:factory source is checked under (conf's defaults)
DATA_FIX = ("data_path must be the site's records in the task's format: image tasks an .npz with `images` "
            "[N, H, W] in [0, 1] and integer `labels` [N]; task=text a CSV, TSV or JSON-lines file or folder, read "
            "with the site file's task: data settings; task=lm a folder or glob of code files; task=tabular a CSV or "
            "Parquet table with the shared table's columns; site.delta must be below 1/N (see conf/site.yaml)")


# -- the whole check ------------------------------------------------------------------


def check_site(site_file: Path, task: str | None = None) -> list[Check]:
    """Every check of the site described by `site_file`, in order, for `task` (a task name of
    conf/task/ or a task source; None: the first of the file's task_sources)."""
    try:
        policy = load_policy(site_file)
    except ConfigError as err:
        return [Check("site file", FAIL, str(err), f"correct {site_file}; conf/site.yaml lists every key with its default")]
    checks = [check_site_file(site_file, policy)]

    task_check, task = check_task(policy, task or policy.task_sources[0])
    data_check, data = check_data(policy, task)
    checks += [task_check, data_check]
    checks += check_teacher_and_public_set(policy, task)
    checks.append(check_ledger(policy, data))

    checks += check_certificates_and_coordinator(policy)
    checks += [check_app_pins(policy), check_timing(policy), check_metrics(policy)]
    return checks


def check_site_file(site_file: Path, policy: SitePolicy) -> Check:
    return Check("site file", OK, f"{site_file}: site {site_name(policy)}, budget epsilon {policy.epsilon:g} "
                                  f"at delta {policy.delta:g}")


def site_name(policy: SitePolicy) -> str:
    return policy.name or DEFAULT_SITE_NAME


# -- the task and the site's records --------------------------------------------------


def check_task(policy: SitePolicy, source: str) -> tuple[Check, Task | None]:
    """The task the site is checked for, allowed by its file's task_sources (checked before the task is
    built: a `package.module:factory` source runs code), and built as the site builds it: conf/task/
    with the site file's own task settings."""
    source = source.removeprefix("task=")
    if source not in policy.task_sources:
        return Check("task", FAIL, f"task {source!r} is not in task_sources {policy.task_sources}: the site would "
                                   "refuse every run of it",
                     f"add {source} to task_sources in the site file, or check the task the coordinator runs "
                     "with --task NAME"), None
    name = source if source in available_tasks() else CUSTOM_TASK
    try:
        task = build_task(site_task_config(policy, name, source))
    except Exception as err:  # any task's constructor, a listed `package.module:factory` included
        return Check("task", FAIL, f"task {source!r} cannot be built from the site's settings: {message(err)}",
                     "correct the task settings in the site file (task:, teacher_path; conf/site.yaml says what "
                     "each key means)"), None
    return Check("task", OK, f"{name} (task source {source}, allowed by task_sources)"), task


def check_data(policy: SitePolicy, task: Task | None) -> tuple[Check, TensorDataset | None]:
    """data_path is set, exists, is readable and holds records the task can load with the site's settings."""
    if task is None:
        return Check("data", WARN, "not checked: the task did not load (see above)"), None
    if policy.data_path is None:
        return Check("data", FAIL, "data_path is not set: a deployed site trains on its own records",
                     f"set data_path to the file or folder of the site's records; {DATA_FIX}"), None
    path = Path(policy.data_path).expanduser()
    missing = _missing_path(path)
    if missing:
        return Check("data", FAIL, f"data_path {path} {missing}",
                     f"put the site's records at {path}, or set data_path to where they are; {DATA_FIX}"), None
    if not os.access(path, os.R_OK):
        return Check("data", FAIL, f"data_path {path} is not readable by this user",
                     f"let the user who runs `fedistill site` read it (chown or chmod u+r {path})"), None
    try:
        data = read_records(task, policy)
    except Exception as err:  # any task's loader: report what it says rather than a traceback
        return Check("data", FAIL, f"data_path {path} cannot be loaded: {message(err)}", DATA_FIX), None
    return Check("data", OK, f"{path}: {describe_records(data)}"), data


def _missing_path(path: Path) -> str:
    """'' when `path` exists, else what is missing: the file, or the folder it should be in."""
    if path.exists():
        return ""
    if not path.parent.exists():
        return f"does not exist, nor does its folder {path.parent}"
    return "does not exist"


def describe_records(data: TensorDataset) -> str:
    """'1797 records, 10 classes (0-9)': the count, and the classes where labels are one per record."""
    labels = data.tensors[1] if len(data.tensors) > 1 else None
    count = f"{len(data)} records"
    if labels is None or labels.ndim != 1 or labels.is_floating_point():
        return count
    classes = sorted(int(c) for c in labels.unique())
    shown = f"{classes[0]}-{classes[-1]}" if classes == list(range(classes[0], classes[-1] + 1)) else ", ".join(map(str, classes))
    return f"{count}, {len(classes)} classes ({shown})"


# -- the teacher and the public set ---------------------------------------------------


def check_teacher_and_public_set(policy: SitePolicy, task: Task | None) -> list[Check]:
    if task is None:
        return [Check("teacher", WARN, "not checked: the task did not load (see above)")]
    return [check_teacher(policy, task), check_public_set(policy, task)]


def check_teacher(policy: SitePolicy, task: Task) -> Check:
    """The digest of what the site's teacher is made from, against the file's teacher_sha256."""
    where = f"the teacher file or folder (teacher_path: {policy.teacher_path})" if policy.teacher_path else \
        "the coordinator's task settings, from which the teacher is made (the site file's task: settings must match)"
    try:
        digest = task.teacher_digest()
    except Exception as err:  # a missing or unreadable teacher, in any task
        return Check("teacher", FAIL, f"the teacher cannot be read: {message(err)}",
                     f"get {where} from the coordinator; teacher_path names the site's copy")
    return _compare_pin("teacher", "teacher_sha256", digest, policy.teacher_sha256, where)


def check_public_set(policy: SitePolicy, task: Task) -> Check:
    """The digest of the public inputs, against the file's public_sha256."""
    where = "the public set's files and task settings the coordinator uses (the site file's task: settings must match)"
    try:
        digest = str(P.public_manifest(task.public_inputs())[P.PUBLIC_SHA256])
    except Exception as err:  # missing public files, in any task
        return Check("public set", FAIL, f"the public set cannot be read: {message(err)}",
                     f"get {where} from the coordinator")
    return _compare_pin("public set", "public_sha256", digest, policy.public_sha256, where)


def _compare_pin(name: str, key: str, digest: str, pinned: str | None, where: str) -> Check:
    if pinned is None:
        return Check(name, WARN, f"not pinned: pin with {key}: {digest}",
                     f"compare it with what `fedistill assets` prints on the coordinator, then add {key}: {digest} "
                     "to the site file")
    if digest != pinned:
        return Check(name, FAIL, f"this site's {name} has digest {digest}, but {key} pins {pinned}: the site would "
                                 "refuse every run",
                     f"get {where} from the coordinator (`fedistill assets` there prints the digest); or, if the "
                     f"coordinator changed its {name} on purpose, set {key} to its new digest")
    return Check(name, OK, f"matches {key} {digest}")


# -- the privacy ledger ---------------------------------------------------------------


def check_ledger(policy: SitePolicy, data: TensorDataset | None) -> Check:
    """The site's ledger: none yet (the full budget is left), or readable, for these records, with
    budget left. It is only read: PrivacyLedger writes nothing until a round reserves steps."""
    folder = policy.ledger_root / site_name(policy)
    path = folder / LEDGER_FILE
    if not path.exists():  # checked first: PrivacyLedger would create the folder
        return Check("ledger", OK, f"no ledger yet in {folder}: full budget epsilon {policy.epsilon:g} left")
    budget = Budget(policy.epsilon, policy.delta)
    try:  # without the records, read it for the records it says it covers
        ledger = PrivacyLedger(folder, budget=budget, data=file_records(data)) if data is not None else \
            PrivacyLedger.inspect(folder, budget=budget)
    except LedgerError as err:
        return Check("ledger", FAIL, str(err),
                     f"if it names a setting or the records, make the site file or data_path agree with the ledger; "
                     f"if {path} is damaged, restore it from your backup. Never delete or move a ledger aside: a new "
                     "one starts at epsilon 0, which resets the site's budget and voids its guarantee")
    spent = ledger.epsilon_spent(policy.delta)
    left = policy.epsilon - spent
    if left <= 0:
        why = "these records were released without DP" if ledger.released_without_dp else \
            f"epsilon {spent:.4g} of {policy.epsilon:g} is spent"
        return Check("ledger", FAIL, f"{path}: {why}: the site will refuse every DP run",
                     "a ledger's budget cannot be raised once spending started; these records cannot join "
                     "another DP run (tell the coordinator)")
    detail = f"{path}: epsilon {spent:.4g} spent, {left:.4g} left of {policy.epsilon:g} at delta {policy.delta:g}"
    if data is None:
        return Check("ledger", WARN, f"{detail}; not matched against the site's records (they did not load)")
    return Check("ledger", OK, detail)


# -- certificates and key -------------------------------------------------------------


def check_app_pins(policy: SitePolicy) -> Check:
    fix = "add app_sha256: [<digest>] with the digest `fedistill app-hash` prints for the coordinator's app"
    if not policy.app_sha256 and not policy.allow_unpinned_apps:
        return Check("app", FAIL, "no app pinned (app_sha256 is empty): any code the coordinator ships would run here, "
                                  "and `fedistill site` refuses to start", f"{fix}; or allow_unpinned_apps: true for a trial")
    if not policy.app_sha256:
        return Check("app", WARN, "any app version will run (allow_unpinned_apps: true): pin with app_sha256", fix)
    return Check("app", OK, f"{len(policy.app_sha256)} app version(s) pinned by app_sha256")


def check_timing(policy: SitePolicy) -> Check:
    if policy.reply_after_s <= 0:
        return Check("timing", WARN, "reply_after_s is 0: a reply leaves as soon as the round is done, and how long "
                                     "that takes grows with the number of records",
                     "set reply_after_s above the slowest round (e.g. 60)")
    return Check("timing", OK, f"replies held until {policy.reply_after_s:g} s after each request")


def check_metrics(policy: SitePolicy) -> Check:
    if policy.metrics_port is None:
        return Check("metrics", WARN, "metrics_port is null: `fedistill site` serves no metrics",
                     "set metrics_port (e.g. 9401) to watch the site's rounds and budget")
    where = f"{policy.metrics_host}:{policy.metrics_port}"
    if policy.metrics_host not in ("127.0.0.1", "::1", "localhost"):
        return Check("metrics", WARN, f"served on {where}: every machine that reaches it can read the site's budget "
                                      "and refusals (no authentication)",
                     "metrics_host: 127.0.0.1 and a Prometheus of the site's own, or a firewall rule")
    return Check("metrics", OK, f"served on {where}")


# -- the command (its arguments: fedistill/cli.py) ----------------------------------


def run(args: argparse.Namespace) -> int:
    checks = check_site(args.config, args.task)
    print(format_report(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
