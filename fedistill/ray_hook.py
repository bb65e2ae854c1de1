"""Ray's runtime-environment hook for `fedistill simulate` (RAY_RUNTIME_ENV_HOOK, called by
`ray.init` in Flower's simulation process): the variables named in FORWARD_ENV (the virtual
sites' policy file) travel in the run's runtime environment, so that workers of a Ray cluster
started apart (RAY_ADDRESS), which do not inherit the command's environment, play the sites
under the run's policy and ledgers rather than conf/site.yaml's defaults.

Standard library only: it is imported inside `ray.init`, while Flower's threads import the apps."""

from __future__ import annotations

import os

HOOK = f"{__name__}.with_forwarded_env"
FORWARD_ENV = "FEDISTILL_RAY_FORWARD_ENV"  # comma-separated names of the variables to forward


def with_forwarded_env(runtime_env: dict | None) -> dict:
    """`runtime_env` with the variables FORWARD_ENV names, as this process has them, among its own."""
    names = [name for name in os.environ.get(FORWARD_ENV, "").split(",") if name]
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: Ray's workers would run without them")
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), **{name: os.environ[name] for name in names}}
    return env
