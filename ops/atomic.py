"""Replacing a file or a symlink in one rename, durably.

A reader sees the old content or the new, never a half-written file or a missing name, and after
a power cut the disk holds one or the other too: the new content is fsync'd before the rename, and
the folder after it (a rename is only durable once the folder that records it is).

The temporary name beside the target is `.<name>.<pid>.<random>.tmp`: hidden, unique to the writer
(two threads of one process never share it), and what `leftovers` finds after a writer was killed
between writing and renaming.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{SUFFIX}")


def leftovers(path: str | Path) -> list[Path]:
    """Temporaries of `path` that a killed writer left beside it."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*{SUFFIX}"))


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: str | Path) -> None:
    """Every file and folder under `root` on disk, so that a rename that publishes `root` never
    publishes files whose content is still only in memory. Symlinks are synced with their folder."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)


@contextmanager
def replacing(path: str | Path, *, binary: bool = False, mode: int | None = None,
              encoding: str = "utf-8") -> Iterator[IO]:
    """An open file whose content replaces `path` when the block ends without an exception; on an
    exception `path` is left as it was and the temporary file is removed.

    The new file gets `mode` if given, else the mode of the file it replaces, else the mode any
    new file gets (0o666 less the umask), as open() would have given it."""
    path = Path(path)
    temporary = temporary_name(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb" if binary else "w", encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                pass
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data, *, mode: int | None = None) -> None:
    """`data` (bytes or any buffer, such as a BytesIO's getbuffer()) as the whole of `path`."""
    with replacing(path, binary=True, mode=mode) as fh:
        fh.write(data)


def write_text(path: str | Path, text: str, *, mode: int | None = None, encoding: str = "utf-8") -> None:
    with replacing(path, mode=mode, encoding=encoding) as fh:
        fh.write(text)


def point_symlink(link: str | Path, target: str) -> None:
    """Make `link` a symlink to `target`: a new link renamed over the old name, so that a reader
    finds the old target or the new one and never no link at all."""
    link = Path(link)
    temporary = temporary_name(link)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
