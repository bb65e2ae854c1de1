"""`fedistill kit SITE --coordinator HOST:PORT task=...`: the startup kit the coordinator hands one site.

One folder, `kits/<site>/`, with everything the site needs and nothing of anyone else's:

    ca.crt                 the deployment's CA certificate (public)
    site.key               the site's SuperNode key (secret: the folder is 0700, the key 0600)
    site.yaml              the site file, filled in: its name, the coordinator's address, the
                           key and CA paths, and the current pins (app, teacher, public set)
    fedistill-site.service a systemd unit that runs `fedistill site` with it
    compose.yaml           the same as a container (deploy/site.Dockerfile's image)
    README.md              the site's steps, in order, with its own names and paths

Only `data_path` (where the site's records are) is left for the site to fill in: the
coordinator does not know it. The paths in site.yaml are where the kit is installed at the
site (--install-dir, default /etc/fedistill).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from common.config import CONF_DIR
from fedistill.app_bundle import app_folder
from fedistill.certs import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, site_paths
from fedistill.deployment import DEFAULT_METRICS_HOST, app_hash

DEFAULT_OUT = Path("kits")
DEFAULT_INSTALL = Path("/etc/fedistill")
DEFAULT_VENV = Path("/opt/fedistill")  # where deploy/SITE_GUIDE.md installs fedistill
LEDGER_DIR, CACHE_DIR = "/var/lib/fedistill/ledger", "/var/cache/fedistill"
SITE_METRICS_PORT = 9401


def add_parser(commands: argparse._SubParsersAction) -> None:
    kit = commands.add_parser(
        "kit", help="write one site's startup kit: its key, the CA, a filled-in site file, a systemd unit, a compose "
                    "file and its README",
        description="Write kits/<site>/ for one site of the deployment in --certs (`fedistill certs --site NAME` "
                    "made its key). Overrides such as task=digits choose the task whose teacher and public set are "
                    "pinned; the app pinned is the one in the current folder (or --app).")
    kit.add_argument("site", help="the site's name, as given to `fedistill certs --site`")
    kit.add_argument("overrides", nargs="*", help="the runs' task, e.g. task=digits (its pins go in the site file)")
    kit.add_argument("--coordinator", required=True, help="the coordinator's address as the site dials it, host:port")
    kit.add_argument("--certs", type=Path, default=Path("certs"), help="the `fedistill certs` folder (default: certs)")
    kit.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where kits go (default: {DEFAULT_OUT})")
    kit.add_argument("--install-dir", type=Path, default=DEFAULT_INSTALL,
                     help=f"where the site will put the kit's files (default: {DEFAULT_INSTALL})")
    kit.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                     help=f"the site's Python environment with fedistill, for the systemd unit (default: {DEFAULT_VENV})")
    kit.add_argument("--app", type=Path, default=Path("."), help="the app release the sites pin (default: this folder)")
    kit.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    key, public_key = site_paths(args.certs, args.site)
    ca = args.certs / "ca.crt"
    for path, made_by in ((ca, "fedistill certs"), (key, f"fedistill certs --out {args.certs} --site {args.site}")):
        if not path.is_file():
            raise ValueError(f"{path} does not exist: make it with `{made_by}` first")
    folder = args.out / args.site
    if folder.exists():
        raise ValueError(f"{folder} already exists: remove it, or choose another --out")
    pins = kit_pins(app_folder(args.app), args.overrides)
    folder.mkdir(parents=True, mode=PRIVATE_DIR_MODE)
    folder.chmod(PRIVATE_DIR_MODE)
    shutil.copyfile(ca, folder / "ca.crt")
    shutil.copyfile(key, folder / "site.key")
    (folder / "site.key").chmod(PRIVATE_FILE_MODE)
    install = args.install_dir
    (folder / "site.yaml").write_text(site_file(args.site, args.coordinator, install, pins))
    (folder / "fedistill-site.service").write_text(systemd_unit(args.site, install, args.venv))
    (folder / "compose.yaml").write_text(compose_file(args.site, install))
    (folder / "README.md").write_text(site_readme(args.site, args.coordinator, install, args.venv, pins))
    print(f"Wrote {folder}/: ca.crt, site.key, site.yaml, fedistill-site.service, compose.yaml, README.md\n"
          f"Next:\n  1. Send {folder}/ to {args.site} over a private channel (site.key is its secret); its "
          f"README.md says what to do there.\n"
          f"  2. Here, register its key (once): fedistill register {public_key} --coordinator {args.coordinator} "
          f"--ca {ca}")
    return 0


def kit_pins(app: Path, overrides: list[str]) -> dict:
    """The site file's pins: the app in `app`, and with a task among `overrides`, its teacher and public set."""
    pins: dict = {"app_sha256": [app_hash(app)]}
    if any(o.startswith("task=") for o in overrides):
        from common import payload as P
        from common.config import load_config
        from common.tasks import build_task

        config = load_config(overrides)
        announced = P.asset_manifest(build_task(config))
        pins |= {"teacher_sha256": announced[P.TEACHER_SHA256], "public_sha256": announced[P.PUBLIC_SHA256],
                 "task_sources": [config.task.name]}
    return pins


def site_file(site: str, coordinator: str, install: Path, pins: dict) -> str:
    """conf/site.yaml's keys with this site's values: everything but data_path filled in."""
    values = yaml.safe_load((CONF_DIR / "site.yaml").read_text())
    values |= {"name": site, "ledger_dir": LEDGER_DIR, "cache_dir": CACHE_DIR, "metrics_port": SITE_METRICS_PORT,
               "metrics_host": DEFAULT_METRICS_HOST, **pins,
               "supernode": {"superlink": coordinator, "root_certificates": str(install / "ca.crt"),
                             "private_key": str(install / "site.key"), "insecure": False}}
    header = (f"# {site}'s site file, from the coordinator's `fedistill kit`. Every key is explained in the\n"
              "# fedistill release's conf/site.yaml. Set data_path to your records before `fedistill site-check`;\n"
              "# epsilon, delta, require_dp and max_rounds are your policy: change them as your organisation decides.\n")
    return header + yaml.safe_dump(values, sort_keys=False)


def systemd_unit(site: str, install: Path, venv: Path) -> str:
    return f"""# {site}: `fedistill site` as a service. Install: copy to /etc/systemd/system/, then
#   systemctl daemon-reload && systemctl enable --now fedistill-site
[Unit]
Description=fedistill site {site} (Flower SuperNode and metrics)
After=network-online.target
Wants=network-online.target

[Service]
User=fedistill
Group=fedistill
ExecStart={venv / "bin" / "fedistill"} site --config {install / "site.yaml"}
Restart=on-failure
RestartSec=30
# the ledger and the cache: created for the service's user, kept across restarts and upgrades
StateDirectory=fedistill/ledger
CacheDirectory=fedistill
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true

[Install]
WantedBy=multi-user.target
"""


def compose_file(site: str, install: Path) -> str:
    service = {
        "image": "fedistill-site:0.1.0",
        "init": True,
        "restart": "unless-stopped",
        "command": ["--config", str(install / "site.yaml")],
        "volumes": [f"./site.yaml:{install / 'site.yaml'}:ro", f"./ca.crt:{install / 'ca.crt'}:ro",
                    f"./site.key:{install / 'site.key'}:ro", "./data:/data:ro",
                    f"ledger:{LEDGER_DIR}", f"cache:{CACHE_DIR}"],
    }
    header = (f"# {site} as a container: build the image from the fedistill release the coordinator names\n"
              "#   docker build -f deploy/site.Dockerfile -t fedistill-site:0.1.0 .\n"
              "# put your records in ./data (read-only inside, as /data), set data_path: /data/<file> in site.yaml,\n"
              "# give the container's user the key (sudo chown 10001 site.key), then: docker compose up -d\n"
              "# The ledger is a named volume: `docker compose down` keeps it; never delete it.\n")
    return header + yaml.safe_dump({"name": f"fedistill-{site}", "services": {"site": service},
                                    "volumes": {"ledger": None, "cache": None}}, sort_keys=False)


def site_readme(site: str, coordinator: str, install: Path, venv: Path, pins: dict) -> str:
    task = (pins.get("task_sources") or ["<the task the coordinator names>"])[0]
    return f"""# Startup kit of site {site}

From the coordinator of a fedistill federation. The full guide is the release's
`deploy/SITE_GUIDE.md`; this is the short path, with your names filled in.

| file | secret? | what |
|---|---|---|
| `site.key` | **yes** | your site's key: only the service's user may read it |
| `ca.crt` | no | the federation's CA: your site checks the coordinator ({coordinator}) against it |
| `site.yaml` | no (it names your paths) | your site file: the coordinator's address, the pins of app {pins["app_sha256"][0][:12]}... |
| `fedistill-site.service` | no | a systemd unit that runs `fedistill site` |
| `compose.yaml` | no | the same as a container |

1. Install the fedistill release the coordinator names (SITE_GUIDE.md, step 1), in the Python
   environment the systemd unit names (`{venv}`).
2. Copy `site.yaml`, `ca.crt` and `site.key` to `{install}/` (`chmod 600 {install / "site.key"}`,
   owned by the user that runs the site).
3. In `{install / "site.yaml"}`, set `data_path` to your records, and read `epsilon`, `delta`,
   `require_dp` and `max_rounds`: they are your policy.
4. Check, before joining: `fedistill site-check --config {install / "site.yaml"} --task {task}`.
   Exit code 0 means ready; every failure says its fix.
5. Run it: `cp fedistill-site.service /etc/systemd/system/ && systemctl daemon-reload &&
   systemctl enable --now fedistill-site`, or `docker compose up -d` here.

Your ledger (`{LEDGER_DIR}/{site}/ledger.json`) records every release of your records: back it
up and never delete it. Your metrics are on `127.0.0.1:{SITE_METRICS_PORT}` only.
"""
