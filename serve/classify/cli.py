"""`python -m serve.classify` (`make classify`): score every image under a folder into one file.

    python -m serve.classify IN OUT [--model-dir artifacts] [--top-k 5] [--ray ADDRESS]

Walks IN recursively and writes one row per file to OUT: its path (relative to IN), the top-k
labels and probabilities, the model's name, version and sha256, and an error for a file that
could not be scored (not an image, undecodable, too many pixels, unreadable); a bad file never
stops the run. OUT's extension picks the format: .csv, or .jsonl (JSON Lines).

Scoring is the server's: the same artifact loader, the same Preprocessor and the same inference
threads (serve/scheduler.py), one single-threaded pass per CPU this process may use (CPU
affinity and cgroup quota), so a file scores here exactly as it would over HTTP.

Rerun with the same OUT to resume: files already in it, scored by the same model (sha256), are
skipped, the rest appended. Rows are written as they finish, so an interrupted run (Ctrl-C, a
kill) leaves a valid file missing at most the images that were in flight; a row cut off by a
kill is dropped when the run resumes.

With --ray ADDRESS the same job runs on a Ray cluster (serve/classify/on_ray.py), from the Ray
virtualenv (`make classify-ray`); the rows, and this file's writer, are the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ArtifactError
from ..versions import ModelFolder, VersionError
from .output import Progress, RowWriter
from .rows import MAX_IMAGE_PIXELS, ClassifyError, image_files, model_id


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
    p.add_argument("--actors", type=int, default=None,
                   help="with --ray: scoring actors (default: one per CPU of the cluster)")
    p.add_argument("--batch-size", type=int, default=16, help="with --ray: files per actor call (default: %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="with --ray: seconds to wait for the cluster to answer (default: %(default)s)")
    args = p.parse_args(argv)
    if args.top_k < 1 or args.max_image_pixels < 1 or args.batch_size < 1:
        p.error("--top-k, --max-image-pixels and --batch-size must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    folder = args.input
    files = image_files(folder, skip=args.output)
    output = RowWriter(args.output, args.top_k)
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
        from .on_ray import RayScorer
        scorer = RayScorer(args.ray, model_folder, version, args)
    else:
        from .local import LocalScorer
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


