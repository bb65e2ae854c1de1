"""A site's gate on the code the coordinator ships: only an app whose hash the site pinned runs.

The coordinator sends the app (a FAB) to every site, so a privacy policy is only as good as
the code that enforces it. Flower 1.41's own check, `flower-supernode --trusted-entities`,
accepts only FABs that Flower's hub signed: an open-source SuperLink sends a locally built
app with no signature, and such a SuperNode refuses every run. So the check sits in code the
site installed itself: Flower starts a ClientApp as `flwr-clientapp` from PATH, and
`fedistill site` puts this launcher first on its SuperNode's PATH. It checks the FAB's
SHA-256 (Flower's FAB hash; `fedistill app-hash` prints it) against the site's
`app_sha256` before Flower installs or imports anything from it; a FAB that is not pinned
ends the ClientApp with an error reply, before any of its code runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

APP_SHA256_ENV = "FEDISTILL_APP_SHA256"  # the pinned digests, separated by spaces
ACTIVITY_ENV = "FEDISTILL_ACTIVITY_DIR"  # the site's ledger folder, whose activity log counts the refusal
LAUNCHER = "flwr-clientapp"


class AppNotVetted(RuntimeError):
    """The coordinator sent an app this site has not pinned (its name is common.payload.APP_NOT_PINNED,
    which the coordinator reads in the error reply as a refusal with code `app`)."""


def install_launcher(folder: Path) -> Path:
    """Write the `flwr-clientapp` launcher into `folder` (to be put first on PATH); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / LAUNCHER
    launcher.write_text(f"#!{sys.executable}\nfrom fedistill.app_gate import main\nmain()\n")
    launcher.chmod(0o755)
    return launcher


def check(fab: bytes, pinned: set[str]) -> None:
    digest = hashlib.sha256(fab).hexdigest()
    if digest not in pinned:
        raise AppNotVetted(f"the coordinator sent app {digest}, which is not one this site pinned (site "
                           "app_sha256); the site runs no code from it")


def main() -> None:
    """Flower's `flwr-clientapp`, with the FAB checked before it is installed."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    pinned = set(os.environ.get(APP_SHA256_ENV, "").split())
    install = runtime.install_from_fab

    def install_vetted(fab_file, *args, **kwargs):
        try:
            check(fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes(), pinned)
        except AppNotVetted:
            record_refusal()
            raise
        return install(fab_file, *args, **kwargs)

    runtime.install_from_fab = install_vetted
    flwr_clientapp()


def record_refusal() -> None:
    """Count the refusal in the site's activity log (its metrics), as the app does for the refusals it makes."""
    from common import payload as P
    from common.monitoring import record_activity  # reads ledgers: imported only when there is a refusal

    folder = os.environ.get(ACTIVITY_ENV)
    if folder:
        record_activity(Path(folder), run="", server_round=0, status=P.STATUS_REFUSED, code=P.REFUSAL_APP)
