"""The deploy folder on disk and the only ways it changes.

    PREFIX/current            symlink to releases/<id>: what the service runs
    PREFIX/releases/<id>/     complete releases: the code, .venv/serve, release.json; never edited
    PREFIX/releases/.build-<id>/   a release being built (removed if the build fails or is killed)
    PREFIX/history            releases a rollback goes back through, one per line, newest last
    PREFIX/logs/<id>.log      each deploy's full output (pip, the release check's server)
    PREFIX/.lock              held while a deploy or rollback runs

A release directory appears under its final name only by a rename once it is complete and checked,
and `current` only ever changes by renaming a new symlink over it, so a crash at any moment leaves
either the old state or the new one. Those mechanics are ops/store.py's, shared with the model
folder; what is deploy's own is the build folder, the history and the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from ops import atomic
from ops.store import REMOVE_PREFIX, Store, discard

from .policy import RELEASE_NAME

RELEASE_FILE = "release.json"
BUILD_PREFIX = ".build-"


class Prefix:
    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))  # normalised, but symlinks kept: the service uses this path
        self.releases = self.root / "releases"
        self.current = self.root / "current"
        self.history_file = self.root / "history"
        self.logs = self.root / "logs"
        self.lock_file = self.root / ".lock"
        self._lock_fd: int | None = None
        self.store = Store(self.root, self.releases, names=RELEASE_NAME, marker=RELEASE_FILE, absolute_links=True)

    # --- locking --------------------------------------------------------------------------------

    def lock(self) -> bool:
        """Take the prefix for this process; False if another deploy or rollback holds it. The lock
        goes with the process, so a killed deploy never leaves it held."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    # --- reading ----------------------------------------------------------------------------------

    def release_dir(self, name: str) -> Path:
        return self.releases / name

    def current_release(self) -> str | None:
        """The release `current` points at, or None before the first deploy."""
        if not self.current.is_symlink():
            if self.current.exists():
                raise ValueError(f"{self.current} is not a symlink; move it away so that deploys can manage it")
            return None
        target = self.store.read_link(self.current.name)
        name = self.store.named(target)
        if name is None:
            raise ValueError(f"{self.current} points at {target}, not at a release in {self.releases}")
        return name

    def is_complete(self, name: str) -> bool:
        return self.store.is_version(name)

    def complete_releases(self) -> list[str]:
        return self.store.versions()

    def release_info(self, name: str) -> dict:
        try:
            return json.loads((self.release_dir(name) / RELEASE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def read_history(self) -> list[str]:
        try:
            lines = self.history_file.read_text(encoding="utf-8").split()
        except FileNotFoundError:
            return []
        return [line for line in lines if RELEASE_NAME.match(line)]

    def leftovers(self) -> list[Path]:
        """What interrupted deploys and removals left behind: half-built releases, the names that
        pointed at them while they were built, half-removed releases, temporary symlinks."""
        found = self.store.leftovers(self.current.name) + atomic.leftovers(self.history_file)
        if self.releases.is_dir():
            found += [entry for entry in self.releases.iterdir()
                      if entry.name.startswith(BUILD_PREFIX) or (entry.is_symlink() and RELEASE_NAME.match(entry.name))]
        return sorted(found)

    # --- changing -----------------------------------------------------------------------------------

    def switch(self, name: str) -> None:
        """Point `current` at a release: a new symlink renamed over the old one (rename(2) is atomic,
        so a reader sees either the old target or the new one, never a missing `current`)."""
        self.store.point(self.current.name, name)

    def add(self, building: Path, name: str) -> None:
        """Make a built and checked release folder the release `name`: its files on disk first,
        then one rename."""
        self.store.add(building, name)

    def write_history(self, stack: list[str]) -> None:
        atomic.write_text(self.history_file, "".join(f"{name}\n" for name in stack))

    def remove(self, path: Path) -> None:
        """Delete a release or a leftover. A release is first renamed out of the releases' namespace,
        so that a removal cut short never leaves a half-deleted folder under a release's name."""
        if path.is_symlink() or path.is_file() or path.name.startswith((BUILD_PREFIX, REMOVE_PREFIX)):
            discard(path)
        else:
            self.store.remove(path.name)
