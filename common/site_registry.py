"""The coordinator's register of sites: which Flower node id is which site, by the name the
coordinator registered it under (`fedistill register` writes it, `fedistill unregister` removes
a site, the ServerApp and `fedistill status` read it).

A site's reply also says its name, but that is what the site says; this file is what the
coordinator decided, and it names a node whose app never ran (a refused app, a crash) too.
The file lives in the coordinator's state folder; `fedistill coordinator` tells the ServerApp
where through SITES_ENV.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SITES_ENV = "FEDISTILL_SITES_FILE"
SITES_FILE = "sites.json"
KEY_COMMENT_PREFIX = "fedistill-site-"  # `fedistill certs` ends each public key with this and the site's name


def site_name_of_key(public_key: Path) -> str:
    """The site a public key file is for: the name `fedistill certs` wrote in its comment, else the file's stem."""
    fields = public_key.read_text().split()
    comment = fields[2] if len(fields) > 2 else ""
    return comment.removeprefix(KEY_COMMENT_PREFIX) if comment.startswith(KEY_COMMENT_PREFIX) else public_key.stem


class SiteRegistry:
    """node id -> site name, kept in one JSON file, read on every use (sites are registered while
    a run goes on) and written whole, atomically, on every change."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def from_environment(cls) -> SiteRegistry | None:
        """The register `fedistill coordinator` named for this process, or None (a simulation, a bare SuperLink)."""
        path = os.environ.get(SITES_ENV)
        return cls(Path(path)) if path else None

    def names(self) -> dict[int, str]:
        if not self.path.exists():
            return {}
        try:
            return {int(node): str(name) for node, name in json.loads(self.path.read_text()).items()}
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{self.path} is not a site register ({err}): restore it, or delete it and "
                             "register the sites again with `fedistill register`") from None

    def node_of(self, name: str) -> int | None:
        return next((node for node, known in self.names().items() if known == name), None)

    def check_free(self, name: str) -> None:
        """Refuse a name another node already has (before anything is registered with Flower)."""
        other = self.node_of(name)
        if other is not None:
            raise ValueError(f"a site named {name!r} is already registered as node {other}: unregister it first "
                             f"(`fedistill unregister {name} ...`), or give the new site another name")

    def add(self, node_id: int, name: str) -> None:
        self._write({**self.names(), node_id: name})

    def remove(self, node_id: int) -> None:
        self._write({node: name for node, name in self.names().items() if node != node_id})

    def _write(self, names: dict[int, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({str(node): name for node, name in sorted(names.items())}, indent=1))
        os.replace(temporary, self.path)
