"""The training data folder checked before any epoch runs: a bad photo or a class with too few
photos would otherwise surface hours later, or not at all."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

MIN_PHOTOS = 5


class DataFolderError(Exception):
    """One line naming the class folder or photo to fix."""


def check(items: list[Path], root: Path, min_photos: int = MIN_PHOTOS) -> None:
    """`items` are the photos fastai found under `root`, labelled by their parent folder.

    Every class needs at least `min_photos` (the split must leave some for training and for
    validation), and every photo must decode whole: Pillow's full load, not just its header.
    """
    counts: dict[str, int] = {}
    for item in items:
        counts[item.parent.name] = counts.get(item.parent.name, 0) + 1
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        counts.setdefault(folder.name, 0)
    few = sorted((n, name) for name, n in counts.items() if n < min_photos)
    if few:
        n, name = few[0]
        more = f" (and {len(few) - 1} more class folders)" if len(few) > 1 else ""
        raise DataFolderError(f"{root / name} has {n} photo{'s' * (n != 1)}; every class needs at least "
                              f"{min_photos}{more}")
    for item in sorted(items):
        try:
            with Image.open(item) as image:
                image.load()
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a broken file
            raise DataFolderError(f"{item} cannot be read as an image ({type(exc).__name__}: {exc}); "
                                  "remove or replace it") from None
