"""The files in deploy/ are what the tools that read them accept, checked offline.

The schemas come with installed packages, nothing is fetched: the Compose specification's
is the copy check-jsonschema vendors, Kubernetes' are those kubernetes-validate bundles.
No image is built here: the Dockerfiles are read with BuildKit's parser (`dockerfile`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from kubernetes_validate.utils import latest_version
from yamllint import linter
from yamllint.config import YamlLintConfig

from common.config import ConfigError
from common.monitoring import SERVER_METRICS, SITE_METRICS
from common.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_MANIFESTS = ("coordinator.yaml", "site.yaml")
SITE_FILES = ("site-a.yaml", "site-b.yaml")
SITE_FILE_IN_CONTAINER = "/etc/fedistill/site.yaml"
YAML_FILES = sorted(path.relative_to(DEPLOY) for path in [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
# The oldest Kubernetes the manifests promise to work on, and the newest with schemas here.
K8S_VERSIONS = ("1.29", latest_version())
HISTOGRAMS = ("fedistill_server_aggregation_seconds", "fedistill_server_round_seconds")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# Duplicate keys matter most: PyYAML keeps the last one silently, and so would the tools.
YAMLLINT = YamlLintConfig("extends: default\nrules: {document-start: disable, line-length: {max: 110}}")
# Words in a PromQL expression that are neither functions (followed by "(") nor metrics.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                   "group_left", "group_right", "inf", "nan"}


def load(path: Path):
    return yaml.safe_load(path.read_text())


def compose_sites() -> dict[str, dict]:
    """The compose services that run a site, each with the site file it mounts."""
    services = load(DEPLOY / "compose.yaml")["services"]
    sites = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if target == SITE_FILE_IN_CONTAINER:
                sites[name] = load(DEPLOY / source)
    return sites


def key_tree(mapping: dict) -> dict:
    return {key: key_tree(value) if isinstance(value, dict) else None for key, value in mapping.items()}


def policy_keys() -> dict:
    """conf/site.yaml holds every key a site file may set."""
    return key_tree(load(ROOT / "conf/site.yaml"))


def k8s_documents(manifest: str, kind: str | None = None) -> list[dict]:
    documents = yaml.safe_load_all((DEPLOY / "k8s" / manifest).read_text())
    return [document for document in documents if kind in (None, document["kind"])]


def k8s_site_file() -> dict:
    (config_map,) = k8s_documents("site.yaml", "ConfigMap")
    return yaml.safe_load(config_map["data"]["site.yaml"])


def build_inputs() -> set[str]:
    """What `pip install .` reads: pyproject.toml, the files it names and the packages it finds."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    inputs = {"pyproject.toml", pyproject["project"]["readme"]}
    for dynamic in setuptools.get("dynamic", {}).values():
        inputs.update(dynamic.get("file", []))
    return inputs | {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}


def dashboard_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/fedistill-dashboard.json").read_text())


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, range durations
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label names
    names = set()
    for match in re.finditer(r"\b[a-zA-Z_:][\w:]*", expr):
        is_function = expr[match.end():].lstrip().startswith("(")
        if not is_function and match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def exported_metric(name: str) -> str:
    """The exported metric a series belongs to: a histogram's series carry a suffix."""
    for histogram in HISTOGRAMS:
        if name in (histogram + series for series in HISTOGRAM_SERIES):
            return histogram
    return name


def test_compose_file_follows_the_compose_specification():
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(load(DEPLOY / "compose.yaml"))]
    assert not errors


def test_compose_refers_to_files_that_are_in_the_repository():
    """Everything a service builds from or mounts is here, except what the site brings: certs/ and data/."""
    for name, service in load(DEPLOY / "compose.yaml")["services"].items():
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.startswith(("./certs/", "./data/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"


def test_compose_keeps_each_sites_ledger_on_a_named_volume():
    """Where the site file puts the ledger, a named volume is mounted: `down` keeps it."""
    compose = load(DEPLOY / "compose.yaml")
    sites = compose_sites()
    assert sites, f"no compose service mounts a site file at {SITE_FILE_IN_CONTAINER}"
    for name, site_file in sites.items():
        volumes = (volume.split(":") for volume in compose["services"][name]["volumes"])
        mounts = {target: source for source, target, *_ in volumes}
        assert mounts.get(site_file["ledger_dir"]) in compose["volumes"], f"{name}'s ledger is not on a named volume"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", K8S_MANIFESTS)
def test_kubernetes_manifests_follow_the_kubernetes_schemas(manifest, version):
    documents = k8s_documents(manifest)
    assert documents
    for document in documents:
        # strict: a misspelt field is an error, not a field Kubernetes silently ignores
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("image", ["coordinator", "site"])
def test_images_match_what_their_kubernetes_manifest_expects(image):
    """The user the pod runs as, the ports it names and the command are the image's."""
    commands = dockerfile.parse_file(str(DEPLOY / f"{image}.Dockerfile"))
    assert {command.cmd.lower() for command in commands} <= set(dockerfile.all_cmds())
    last = {command.cmd: command.value for command in commands}  # the last of each instruction counts
    (workload,) = [d for d in k8s_documents(f"{image}.yaml") if d["kind"] in ("Deployment", "StatefulSet")]
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert last["USER"] == (f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",)
    assert set(last.get("EXPOSE", ())) == {str(port["containerPort"]) for port in container.get("ports", [])}
    assert last["ENTRYPOINT"] == ("fedistill", image)


@pytest.mark.parametrize("image", ["coordinator", "site"])
def test_images_copy_what_pip_install_builds_from(image):
    """No image is built here, so a file pyproject.toml starts to need would go unnoticed until one is."""
    copies = [command.value[:-1] for command in dockerfile.parse_file(str(DEPLOY / f"{image}.Dockerfile"))
              if command.cmd == "COPY"]
    sources = {source for sources in copies for source in sources}
    assert build_inputs() <= sources
    assert all((ROOT / source).exists() for source in sources)


def test_kubernetes_site_keeps_its_ledger_on_a_retained_claim():
    """Where the site file puts the ledger, a volume claim template is mounted, never an emptyDir."""
    (site,) = k8s_documents("site.yaml", "StatefulSet")
    (container,) = site["spec"]["template"]["spec"]["containers"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    claims = {claim["metadata"]["name"] for claim in site["spec"]["volumeClaimTemplates"]}
    assert mounts.get(k8s_site_file()["ledger_dir"]) in claims
    retained = {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert site["spec"]["persistentVolumeClaimRetentionPolicy"] == retained


def test_the_coordinators_prometheus_scrapes_the_coordinator_and_no_site():
    jobs = {job["job_name"]: job["static_configs"] for job in load(DEPLOY / "prometheus.yml")["scrape_configs"]}
    assert jobs == {"fedistill-coordinator": [{"targets": ["coordinator:9400"]}]}


def test_a_sites_prometheus_scrapes_the_site_on_its_own_loopback():
    jobs = {job["job_name"]: job["static_configs"] for job in load(DEPLOY / "site-prometheus.yml")["scrape_configs"]}
    for name, site in compose_sites().items():
        assert site["metrics_host"] == "127.0.0.1", name
        assert jobs == {"fedistill-site": [{"targets": [f"127.0.0.1:{site['metrics_port']}"]}]}


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian: apt-get install prometheus)")
@pytest.mark.parametrize("config", ["prometheus.yml", "site-prometheus.yml"])
def test_promtool_accepts_the_prometheus_configs(config):
    result = subprocess.run(["promtool", "check", "config", str(DEPLOY / config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_names_are_found_in_promql_and_nothing_else():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(a_seconds_bucket{site=~"$site"}[5m])))'
            " / on (x) b_total offset 1h")
    assert metric_names(expr) == {"a_seconds_bucket", "b_total"}


def test_dashboard_queries_only_metrics_the_code_exports():
    assert set(HISTOGRAMS) <= set(SERVER_METRICS)
    exported = set(SERVER_METRICS) | set(SITE_METRICS)
    for panel in dashboard_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            unknown = {name for name in metric_names(target["expr"]) if exported_metric(name) not in exported}
            assert not unknown, f"panel {panel['title']!r} queries {sorted(unknown)}: not exported by the code"


def test_dashboard_shows_every_exported_metric():
    shown = {exported_metric(name) for panel in dashboard_panels(dashboard()["panels"])
             for target in panel.get("targets", []) for name in metric_names(target["expr"])}
    missing = (set(SERVER_METRICS) | set(SITE_METRICS)) - shown
    assert not missing, f"no panel shows {sorted(missing)}"


def test_dashboard_queries_the_prometheus_chosen_on_import():
    board = dashboard()
    variable = {"name": "DS_PROMETHEUS", "type": "datasource", "query": "prometheus"}
    assert variable.items() <= board["templating"]["list"][0].items()
    chosen = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in dashboard_panels(board["panels"]):
        for target in panel.get("targets", []):
            assert panel["datasource"] == target["datasource"] == chosen, panel["title"]


@pytest.mark.parametrize("site_file", SITE_FILES)
def test_site_files_set_exactly_the_keys_of_the_site_policy(site_file):
    site = load(DEPLOY / "sites" / site_file)
    assert key_tree(site) == policy_keys()
    assert site["name"] == Path(site_file).stem


def test_kubernetes_site_file_sets_exactly_the_keys_of_the_site_policy():
    assert key_tree(k8s_site_file()) == policy_keys()


@pytest.mark.parametrize("site_file", [*(DEPLOY / "sites" / name for name in SITE_FILES), "k8s"], ids=str)
def test_a_shipped_site_file_pins_the_app_and_does_not_start_until_the_pin_is_filled_in(site_file, tmp_path):
    """The examples pin (allow_unpinned_apps false): their placeholder digest is refused with the fix."""
    site = k8s_site_file() if site_file == "k8s" else load(site_file)
    assert site["app_sha256"] and site["allow_unpinned_apps"] is False and site["reply_after_s"] > 0
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site))
    with pytest.raises(ConfigError, match="fedistill app-hash"):
        load_policy(path)
    path.write_text(yaml.safe_dump({**site, "app_sha256": ["a" * 64]}))
    assert load_policy(path).app_sha256 == ["a" * 64]


@pytest.mark.parametrize("path", YAML_FILES, ids=str)
def test_yaml_files_lint_clean(path):
    problems = [f"{path}:{p.line}:{p.column} {p.message}" for p in linter.run((DEPLOY / path).read_text(), YAMLLINT)]
    assert not problems
