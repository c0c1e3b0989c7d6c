"""Watching what reaches the disk: each fsync (by the inode it flushed) and each rename, in order."""

from __future__ import annotations

import os
from pathlib import Path


def record_syncs(monkeypatch, rename: str = "replace") -> list[tuple]:
    """Events ("fsync", inode) and ("rename", the new name) from now on; `rename` is the os
    function that renames (os.replace for files and links, os.rename for folders)."""
    events = []
    real_fsync, real_rename = os.fsync, getattr(os, rename)

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def renaming(src, dst):
        events.append(("rename", Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, rename, renaming)
    return events


def synced(path: Path) -> tuple:
    return ("fsync", path.stat().st_ino)
