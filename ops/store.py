"""Version folders side by side, and symlinks that say which one is in use.

    ROOT/current  -> FOLDER/<version>     a link, switched by renaming a new link over it
    FOLDER/<version>/                     a complete version: it appears by one rename, whole
    FOLDER/.remove-<version>/             a version being deleted (renamed out of the way first)

The model folder (serve/model/versions.py: ROOT and FOLDER are one, versions are numbers) and the
deploy prefix (deploy/layout.py: versions are releases in ROOT/releases, named by time) are both
such a store. They differ in what they keep besides `current` (a `previous` link, a history of
releases) and so in what a rollback does; the ways the disk changes are the ones here: a link
switch is a rename followed by an fsync of its folder, a version is synced before the rename that
adds it, a removal renames the version away before deleting it, and a prune keeps the newest and
never what the caller protects.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Container
from pathlib import Path

from .atomic import fsync_dir, leftovers, point_symlink, sync_tree

REMOVE_PREFIX = ".remove-"


def prunable(versions: list[str], keep: int, protected: Container) -> list[str]:
    """Which of `versions` (oldest first) a prune removes, oldest first: all but the newest `keep`,
    never one in `protected` (what is current, what a rollback returns to). A `keep` of zero or
    less removes nothing."""
    if keep <= 0:
        return []
    return [name for name in versions[:-keep] if name not in protected]


def discard(path: Path) -> None:
    """Delete a leftover (a file, a link, or a folder no name points into)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


class Store:
    """`names` says which folder names are versions; `numbered` orders them as numbers (and lets
    `add` pick the next one), otherwise as strings. With `marker`, a folder is a version only once
    that file is in it. `absolute_links` also reads a link to a version's absolute path as naming
    it (the store itself always writes relative links, so that the whole root can move)."""

    def __init__(self, root: str | Path, folder: str | Path | None = None, *, names: re.Pattern[str],
                 numbered: bool = False, marker: str | None = None, absolute_links: bool = False):
        self.root = Path(root)
        self.folder = self.root if folder is None else Path(folder)
        self.names, self.numbered, self.marker, self.absolute_links = names, numbered, marker, absolute_links
        relative = os.path.relpath(self.folder, self.root)
        self._link_parent = "" if relative == "." else relative

    # --- reading ----------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.folder / name

    def is_version(self, name: str) -> bool:
        path = self.path(name)
        if self.names.match(name) is None or path.is_symlink():
            return False
        return path.is_dir() if self.marker is None else (path / self.marker).is_file()

    def versions(self) -> list[str]:
        """The versions present, oldest first."""
        try:
            names = [entry.name for entry in self.folder.iterdir() if self.is_version(entry.name)]
        except OSError:
            return []
        return sorted(names, key=int) if self.numbered else sorted(names)

    def read_link(self, link: str) -> str | None:
        """What ROOT/`link` points at, as written; None when it is not a symlink."""
        try:
            return os.readlink(self.root / link)
        except OSError:
            return None

    def named(self, target: str | None) -> str | None:
        """The version a link target names (whether or not it exists), or None when the target
        is not a version name in this store's folder."""
        if target is None:
            return None
        parent, _, name = target.rpartition("/")
        if parent != self._link_parent and not (self.absolute_links and parent == os.path.abspath(self.folder)):
            return None
        return name if self.names.match(name) else None

    def linked(self, link: str) -> str | None:
        return self.named(self.read_link(link))

    def leftovers(self, *links: str) -> list[Path]:
        """What an interrupted removal or link switch left: half-removed versions, and temporary
        links beside each of `links`."""
        found = []
        try:
            found += [entry for entry in self.folder.iterdir() if entry.name.startswith(REMOVE_PREFIX)]
        except OSError:
            pass
        for link in links:
            found += leftovers(self.root / link)
        return sorted(found)

    # --- changing ---------------------------------------------------------------------------------

    def point(self, link: str, name: str) -> None:
        """Make ROOT/`link` name version `name`, durably, in one rename."""
        point_symlink(self.root / link, name if not self._link_parent else f"{self._link_parent}/{name}")

    def add(self, staging: Path, name: str | None = None) -> str:
        """Move a finished folder in as version `name` (the next number when None, in a numbered
        store); returns the name. Its files are on disk before the rename makes it a version, and
        the rename is on disk before this returns. `staging` must be on the folder's filesystem."""
        sync_tree(staging)
        while True:
            version = name if name is not None else self._next_number()
            try:
                os.rename(staging, self.path(version))
                break
            except OSError:
                if name is not None or not self.path(version).exists():
                    raise
                # Another writer took this number between our look and our rename.
        fsync_dir(self.folder)
        return version

    def _next_number(self) -> str:
        if not self.numbered:
            raise ValueError("only a numbered store picks names for what it adds")
        versions = self.versions()
        return str(int(versions[-1]) + 1 if versions else 1)

    def remove(self, name: str) -> None:
        """Delete a version, first renamed out of the versions' names, so that a removal cut short
        leaves a leftover and never a half-deleted folder that still looks like a version."""
        doomed = self.path(REMOVE_PREFIX + name)
        os.rename(self.path(name), doomed)
        shutil.rmtree(doomed)

    def prune(self, keep: int, protected: Container) -> list[str]:
        """Remove all but the newest `keep` versions, never one in `protected`; returns the
        versions removed, oldest first."""
        removed = prunable(self.versions(), keep, protected)
        for name in removed:
            self.remove(name)
        return removed
