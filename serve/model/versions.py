"""A model folder on disk: numbered versions side by side, and which one is current.

    artifacts/
      1/          a complete artifact (manifest.json, model.pt, labels.txt, checks/)
      2/
      current  -> 2     the version to serve (a symlink to a sibling, replaced by rename)
      previous -> 1     the version served before it, for a one-step rollback

`make export` adds a version and points `current` at it; `make rollback` swaps `current` and
`previous`; the server loads what `current` names at start-up and on every reload. A folder
that holds one artifact directly (manifest.json at its top, as older exports wrote) is served
as it is, as version "1".

A version is only ever a name this module finds inside the folder: digits, no path. Nothing
here imports torch, so the control commands run in a blink. How the disk changes (links switched
by rename and fsync'd, versions added by rename, removals) is ops/store.py's, shared with deploy.
"""

from __future__ import annotations

import re
from pathlib import Path

from ops.store import Store

CURRENT = "current"
PREVIOUS = "previous"
MANIFEST = "manifest.json"
VERSION_NAME = re.compile(r"^[0-9]{1,9}$")
FLAT_VERSION = "1"
KEEP = 5


class VersionError(ValueError):
    """A version that cannot be used; the message says why in one line."""


def current_folder(path: str | Path) -> Path:
    """The artifact folder of the version a model folder serves (the folder itself when flat)."""
    models = VersionFolder(path)
    return models.folder(models.current())


class VersionFolder:
    """A model folder's numbered versions on disk, and which one `current` names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.store = Store(self.path, names=VERSION_NAME, numbered=True)

    @property
    def flat(self) -> bool:
        """Whether the folder is one artifact itself rather than a folder of versions."""
        return (self.path / MANIFEST).is_file()

    def versions(self) -> list[str]:
        """Version names present, oldest first."""
        return [FLAT_VERSION] if self.flat else self.store.versions()

    def current(self) -> str:
        """The version to serve; VersionError when there is none."""
        if self.flat:
            return FLAT_VERSION
        target = self.store.linked(CURRENT)
        if target is None:
            if (self.path / CURRENT).exists() or (self.path / CURRENT).is_symlink():
                raise VersionError(f"{self.path / CURRENT} must be a symlink to a version folder beside it")
            raise VersionError(f"{self.path} has no {CURRENT} version: it needs {MANIFEST} or numbered version "
                               f"folders with a '{CURRENT}' symlink (write one with `make export`)")
        return self.check(target)

    def previous(self) -> str | None:
        target = None if self.flat else self.store.linked(PREVIOUS)
        return target if target in self.versions() else None

    def check(self, version: str) -> str:
        """`version` if it names a version folder here, else VersionError."""
        if not isinstance(version, str) or not VERSION_NAME.match(version):
            raise VersionError(f"version {version!r} is not a version name: versions are numbers, "
                               f"the folders of {self.path}")
        if version not in self.versions():
            raise VersionError(f"{self.path} has no version {version} (it has {', '.join(self.versions()) or 'none'})")
        return version

    def folder(self, version: str) -> Path:
        """The artifact folder of a version found here."""
        version = self.check(version)
        return self.path if self.flat else self.path / version

    # ------------------------------------------------------------------ changing what is on disk

    def add(self, staging: Path) -> str:
        """Move a finished artifact folder in as the next version (one rename, so the version
        appears whole or not at all); returns its name. `staging` must be on the same filesystem."""
        if self.flat:
            raise VersionError(f"{self.path} holds a single artifact ({MANIFEST} at its top); move it into "
                               f"{self.path / FLAT_VERSION}/ and link {CURRENT} to it, or export elsewhere")
        self.path.mkdir(parents=True, exist_ok=True)
        return self.store.add(staging)

    def point(self, current: str, previous: str | None) -> None:
        """Make `current` (and `previous`) name these versions, each switched by one rename."""
        self.check(current)
        if previous is not None and previous != current:
            self.store.point(PREVIOUS, self.check(previous))
        self.store.point(CURRENT, current)

    def switch_to(self, version: str) -> None:
        """Serve `version` from now on, remembering the version it replaces."""
        before = self.current() if self.store.linked(CURRENT) else None
        self.point(version, before if before != version else self.previous())

    def rollback(self) -> tuple[str, str]:
        """Swap current and previous; returns (the version now current, the one it replaced)."""
        current, previous = self.current(), self.previous()
        if previous is None:
            raise VersionError(f"{self.path} records no previous version to roll back to")
        self.point(previous, current)
        return previous, current

    def prune(self, keep: int = KEEP) -> list[str]:
        """Remove all but the newest `keep` versions, never current or previous; returns the
        versions removed."""
        if self.flat:
            return []
        return self.store.prune(keep, {self.store.linked(CURRENT), self.store.linked(PREVIOUS)})
