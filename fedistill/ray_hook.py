"""Ray's runtime-environment hook for `fedistill simulate` (RAY_RUNTIME_ENV_HOOK, read by
`ray.init` in Flower's simulation process): the virtual sites' policy file travels in the run's
runtime environment, so that workers of a Ray cluster started apart (RAY_ADDRESS), which do
not inherit the command's environment, play the sites under the run's policy and ledgers
rather than conf/site.yaml's defaults."""

from __future__ import annotations

import os

from common.policy import POLICY_ENV

HOOK = f"{__name__}.with_site_policy"


def with_site_policy(runtime_env: dict | None) -> dict:
    """`runtime_env` with the sites' policy file (FEDISTILL_SITE_POLICY) among its variables."""
    if POLICY_ENV not in os.environ:
        raise RuntimeError(f"{POLICY_ENV} is not set: the virtual sites would fall back to the default policy")
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), POLICY_ENV: os.environ[POLICY_ENV]}
    return env
