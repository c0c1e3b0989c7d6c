"""Replacing a folder whole, so readers see either the old one or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_folder(staging: Path, target: Path) -> None:
    """Move the finished `staging` folder to `target`, removing what was there.

    Both must be on one filesystem (staging is made beside target), so each rename is atomic;
    between the two renames `target` is briefly absent, never half-written.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old)
