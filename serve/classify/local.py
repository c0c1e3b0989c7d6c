"""The batch run on this machine: the artifact loaded as the server loads it, one inference thread
per CPU this process may use."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..cpus import available_cpus
from ..postprocess import clamp_k
from .rows import Row, batch_config, score_file


class LocalScorer:
    """The artifact loaded as the server loads it, scoring on every CPU this process may use: one
    inference thread per CPU, fed by enough reading threads to keep each busy."""

    def __init__(self, model_folder: Path, version: str, k: int, max_image_pixels: int):
        from ..handler import load_handler

        self.cpus = available_cpus()
        self.handler = load_handler(model_folder, version, batch_config(model_folder, max_image_pixels, self.cpus))
        self.in_flight = 4 * self.cpus
        self.k = clamp_k(k, len(self.handler.artifact.labels))

    def rows(self, folder: Path, files: list[Path]) -> Iterator[Row]:
        """A row per file, in the files' order."""
        with concurrent.futures.ThreadPoolExecutor(self.in_flight, thread_name_prefix="whatcar-read") as pool:
            yield from ordered(pool, lambda path: score_file(self.handler, folder, path, self.k), files, self.in_flight)

    def close(self) -> None:
        self.handler.close()


def ordered(pool, fn, items: Iterable, window: int) -> Iterator:
    """fn(item) for each item, `window` at a time on `pool`, yielded in the items' order."""
    pending: list[concurrent.futures.Future] = []
    items = iter(items)
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        for future in pending:
            future.cancel()


