"""A batch run's rows: what one file becomes (its ranked classes, or why it could not be scored),
made the same way by the one-machine command and by every Ray actor."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..model.errors import ImageRejected
from ..model.manifest import Manifest
from ..model.settings import InferenceSettings

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class ClassifyError(Exception):
    """The run cannot start or go on; one line says why."""


@dataclass(frozen=True)
class ModelId:
    name: str
    version: str
    sha256: str


@dataclass
class Row:
    path: str
    predictions: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    accepted: bool | None = None  # whether the top class counts as an answer (None: not judged)
    reason: str | None = None     # why not, e.g. "not one of the 164 models I know; closest: ..."
    accepted_level: str | None = None  # "model", "make" (the make alone is the answer) or None
    make: tuple[str, float] | None = None  # the most likely make and its probability

    def to_json(self) -> str:
        """The row as one JSON text, how it travels back from a Ray actor."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Row:
        record = json.loads(text)
        record["predictions"] = [tuple(p) for p in record["predictions"]]
        record["make"] = tuple(record["make"]) if record["make"] is not None else None
        return cls(**record)


def score_file(handler, folder: Path, path: Path, k: int) -> Row:
    """One file's row: read it and have `handler` (serve/model/handler.py) answer it as one request,
    alone in its forward pass, or say why it could not be scored. Both the one-machine command and
    the Ray actors (serve/classify/on_ray.py) make their rows here."""
    from ..model.handler import Options

    relative = str(path.relative_to(folder))
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Row(relative, error=f"unreadable: {exc.strerror or exc}")
    answer = handler.predict([data], Options(top_k=k)).answers[0]
    if isinstance(answer, ImageRejected):
        return Row(relative, error=f"{answer.reason}: {answer.description}")
    make = answer.make
    return Row(relative, [(r.label, round(r.probability, 6)) for r in answer.ranked],
               accepted=answer.verdict.accepted, reason=answer.verdict.reason,
               accepted_level=answer.verdict.level,
               make=(make.label, round(make.probability, 6)) if make is not None else None)


def batch_settings(model_folder: Path, max_image_pixels: int, workers: int) -> InferenceSettings:
    """The inference settings of a batch run: `workers` single-threaded inference threads, every
    image alone in its forward pass. So a file's probabilities do not depend on what it happened
    to share a pass with, and every run (and every Ray actor) gives it the same row to the last
    digit; one image a pass costs no throughput on a small CPU (docs/benchmark.md)."""
    return InferenceSettings(model_dir=model_folder, inference_workers=workers, torch_threads=1, solo_threads=1,
                             micro_batch=1, max_image_pixels=max_image_pixels)


def image_files(folder: Path, skip: Path | None = None) -> list[Path]:
    """Every regular file under `folder`, in a stable order, without `skip` (the output)."""
    if not folder.is_dir():
        raise ClassifyError(f"input folder {folder} does not exist or is not a folder")
    skip = skip.resolve() if skip is not None else None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.resolve() != skip)
    if not files:
        raise ClassifyError(f"input folder {folder} holds no files")
    return files


def model_id(model_folder: Path, version: str) -> ModelId:
    """Which model will score, from its manifest alone (before anything loads)."""
    manifest = Manifest.read(model_folder)
    return ModelId(manifest.name or model_folder.name, version, manifest.model_sha256)


