"""`python -m serve.classify` (`make classify`): score every image under a folder into one file.

    python -m serve.classify IN OUT [--model-dir artifacts] [--top-k 5] [--ray ADDRESS]

Walks IN recursively and writes one row per file to OUT: its path (relative to IN), the top-k
labels and probabilities, the model's name, version and sha256, and an error for a file that
could not be scored (not an image, undecodable, too many pixels, unreadable); a bad file never
stops the run. OUT's extension picks the format: .csv, or .jsonl (JSON Lines).

Scoring is the server's: the same artifact loader, the same Preprocessor and the same inference
threads (serve/inference.py), one single-threaded pass per CPU this process may use (CPU
affinity and cgroup quota), so a file scores here exactly as it would over HTTP.

Rerun with the same OUT to resume: files already in it, scored by the same model (sha256), are
skipped, the rest appended. Rows are written as they finish, so an interrupted run (Ctrl-C, a
kill) leaves a valid file missing at most the images that were in flight; a row cut off by a
kill is dropped when the run resumes.

With --ray ADDRESS the same job runs on a Ray cluster (serve/classify_ray.py), from the Ray
virtualenv (`make classify-ray`); the rows, and this file's writer, are the same.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

# torch mentions at import that numpy is absent; nothing here needs it, and stderr is for the summary.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from .cpus import available_cpus  # noqa: E402
from .errors import ArtifactError, ImageRejected  # noqa: E402
from .manifest import Manifest  # noqa: E402
from .postprocess import clamp_k, rank  # noqa: E402
from .versions import ModelFolder, VersionError  # noqa: E402

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MAX_IMAGE_PIXELS = 50_000_000


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


def rows_for(scored_rows: list, labels: list[str], k: int) -> list[tuple[list[tuple[str, float]], str | None]]:
    """(predictions, error) for each image of a Scored: ranked classes, or the rejection's reason."""
    out = []
    for row in scored_rows:
        if isinstance(row, ImageRejected):
            out.append(([], f"{row.reason}: {row.description}"))
        else:
            out.append(([(r.label, round(r.probability, 6)) for r in rank(row, labels, k)], None))
    return out


# ---------------------------------------------------------------------- the files


def image_files(folder: Path, skip: Path | None = None) -> list[Path]:
    """Every regular file under `folder`, in a stable order, without `skip` (the output)."""
    if not folder.is_dir():
        raise ClassifyError(f"input folder {folder} does not exist or is not a folder")
    skip = skip.resolve() if skip is not None else None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.resolve() != skip)
    if not files:
        raise ClassifyError(f"input folder {folder} holds no files")
    return files


def read(path: Path) -> bytes | str:
    """The file's bytes, or why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


# ---------------------------------------------------------------------- the output


class Output:
    """Rows appended to a CSV or JSON Lines file, each flushed as it is written."""

    def __init__(self, path: Path, k: int):
        self.path, self.k = path, k
        self.format = FORMATS.get(path.suffix.lower())
        if self.format is None:
            raise ClassifyError(f"output {path}: name it .csv or .jsonl to pick the format")
        self.handle = None

    def columns(self) -> list[str]:
        pairs = [f"{kind}_{i}" for i in range(1, self.k + 1) for kind in ("label", "probability")]
        return ["path", *pairs, "model", "version", "sha256", "error"]

    def done(self, model: ModelId) -> set[str]:
        """Paths already in the file scored by this model; drops a last row cut off by a kill."""
        if not self.path.exists():
            return set()
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ClassifyError(f"cannot read {self.path} to resume: {exc.strerror or exc}") from None
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
            data = data[:keep]
        text = data.decode("utf-8", errors="replace")
        seen = set()
        if self.format == "csv":
            records = csv.DictReader(text.splitlines())
            if records.fieldnames and "path" not in records.fieldnames:
                raise ClassifyError(f"{self.path} is not a whatcar output (no 'path' column); choose another name")
            for record in records:
                if record.get("sha256") == model.sha256:
                    seen.add(record["path"])
        else:
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ClassifyError(f"{self.path} line {number} is not JSON; choose another output name") from None
                if record.get("model", {}).get("sha256") == model.sha256:
                    seen.add(record["path"])
        return seen

    def open(self) -> None:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a", encoding="utf-8", newline="")
        except OSError as exc:
            raise ClassifyError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        if self.format == "csv":
            self.writer = csv.writer(self.handle, lineterminator="\n")
            if fresh:
                self.writer.writerow(self.columns())
                self.handle.flush()

    def write(self, row: Row, model: ModelId) -> None:
        if self.format == "csv":
            pairs = [value for label, probability in row.predictions for value in (label, f"{probability:.6f}")]
            pairs += [""] * (2 * self.k - len(pairs))
            self.writer.writerow([row.path, *pairs, model.name, model.version, model.sha256, row.error or ""])
        else:
            self.handle.write(json.dumps({
                "path": row.path,
                "predictions": [{"label": label, "probability": p} for label, p in row.predictions],
                "model": {"name": model.name, "version": model.version, "sha256": model.sha256},
                "error": row.error}) + "\n")
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


# ---------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on a terminal (nothing otherwise), and the summary at the end."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.live = stream.isatty()
        self.scored = self.failed = 0
        self.started = self.shown = time.monotonic()

    def add(self, row: Row) -> None:
        if row.error:
            self.failed += 1
        else:
            self.scored += 1
        now = time.monotonic()
        if self.live and (now - self.shown > 0.2 or self.scored + self.failed == self.total):
            self.shown = now
            done = self.scored + self.failed
            rate = done / max(now - self.started, 1e-9)
            left = (self.total - done) / rate if rate else 0
            width = 30
            bar = "#" * int(width * done / self.total)
            self.stream.write(f"\r[{bar:<{width}}] {done}/{self.total} files  {rate:.1f} images/s  "
                              f"{int(left) // 60}:{int(left) % 60:02d} left ")
            self.stream.flush()

    def summary(self, skipped: int, interrupted: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        done = self.scored + self.failed
        line = (f"{'interrupted: ' if interrupted else ''}scored {self.scored}, failed {self.failed}"
                f"{f', skipped {skipped} already done' if skipped else ''} in {elapsed:.1f} s "
                f"({done / elapsed if elapsed else 0:.1f} images/s)")
        if self.live:
            self.stream.write("\r" + " " * 90 + "\r")
        return line


# ---------------------------------------------------------------------- one machine


def model_id(model_folder: Path, version: str) -> ModelId:
    """Which model will score, from its manifest alone (before anything loads)."""
    manifest = Manifest.read(model_folder)
    return ModelId(manifest.name or model_folder.name, version, manifest.model_sha256)


class LocalScorer:
    """The artifact loaded as the server loads it, scoring on every CPU this process may use: one
    single-threaded inference thread per CPU, fed by enough reading threads to keep each busy."""

    def __init__(self, model_folder: Path, version: str, k: int, max_image_pixels: int):
        from .config import Config
        from .scoring import load_scorer

        self.cpus = available_cpus()
        config = Config(model_dir=model_folder, inference_workers=self.cpus, torch_threads=1, solo_threads=1,
                        max_image_pixels=max_image_pixels)
        self.scorer = load_scorer(model_folder, version, config)
        self.in_flight = 4 * self.cpus * config.micro_batch
        self.k = clamp_k(k, len(self.scorer.labels))

    def rows(self, folder: Path, files: list[Path]) -> Iterator[Row]:
        """A row per file, in the files' order."""

        def one(path: Path) -> Row:
            data = read(path)
            relative = str(path.relative_to(folder))
            if isinstance(data, str):
                return Row(relative, error=data)
            predictions, error = rows_for(self.scorer.score([data]).rows, self.scorer.labels, self.k)[0]
            return Row(relative, predictions, error)

        with concurrent.futures.ThreadPoolExecutor(self.in_flight, thread_name_prefix="whatcar-read") as pool:
            yield from ordered(pool, one, files, self.in_flight)

    def close(self) -> None:
        self.scorer.close()


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


# ---------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.classify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="folder of photos, walked recursively")
    p.add_argument("output", type=Path, help="results file: .csv or .jsonl (appended to, and resumed from)")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("WHATCAR_MODEL_DIR", "artifacts")),
                   help="model folder; its current version scores (default: artifacts, or WHATCAR_MODEL_DIR)")
    p.add_argument("--top-k", type=int, default=5, help="classes per file (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="largest width*height decoded, as the server's limit (default: %(default)s)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run on this Ray cluster (e.g. ray://head:10001, or auto) instead of this machine; "
                        "needs the Ray virtualenv (make classify-ray)")
    p.add_argument("--actors", type=int, default=None, help="with --ray: scoring actors (default: one per CPU of the cluster)")
    p.add_argument("--batch-size", type=int, default=16, help="with --ray: files per actor call (default: %(default)s)")
    args = p.parse_args(argv)
    if args.top_k < 1 or args.max_image_pixels < 1 or args.batch_size < 1:
        p.error("--top-k, --max-image-pixels and --batch-size must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    folder = args.input
    files = image_files(folder, skip=args.output)
    output = Output(args.output, args.top_k)
    models = ModelFolder(args.model_dir)
    try:
        version = models.current()
        model_folder = models.folder(version)
    except VersionError as exc:
        raise ClassifyError(f"cannot use model folder {args.model_dir}: {exc}") from None
    model = model_id(model_folder, version)
    done = output.done(model)
    todo = [f for f in files if str(f.relative_to(folder)) not in done]
    output.open()  # before the model loads: an output that cannot be written fails at once
    if args.ray:
        from .classify_ray import RayScorer
        scorer = RayScorer(args.ray, model_folder, version, args)
    else:
        scorer = LocalScorer(model_folder, version, args.top_k, args.max_image_pixels)
    progress = Progress(len(todo))
    interrupted = False
    try:
        for row in scorer.rows(folder, todo):
            output.write(row, model)
            progress.add(row)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        scorer.close()
        output.close()
    print(progress.summary(len(files) - len(todo), interrupted), file=sys.stderr)
    return 130 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ClassifyError, ArtifactError) as exc:
        print(f"whatcar classify: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
