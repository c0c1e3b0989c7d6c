"""Make, model, body style and year of each class, written into an exported version's manifest.

    python -m export.classnames MODEL_VERSION_FOLDER [--data DATA]

writes the fields learners/classnames.py parses into an existing version's manifest.json as its
`classes` list, for versions exported before the exporter wrote it.

Standard library only, so that it runs wherever the artifact is, with no training stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from learners.classnames import class_fields
from ops import atomic


def add_to_version(folder: Path, data: Path | None = None) -> list[dict]:
    """Write the `classes` list into `folder`'s manifest.json; returns it. Without `data`, the
    training data folder the manifest records is used when it is here."""
    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    labels = (Path(folder) / manifest["files"]["labels"]["file"]).read_text(encoding="utf-8").splitlines()
    if data is None:
        recorded = ((manifest.get("source") or {}).get("training") or {}).get("data")
        data = Path(recorded) if recorded and Path(recorded).is_dir() else None
    classes = class_fields(labels, data)
    manifest["classes"] = classes
    # A reader sees the old manifest or the new one, never half of one, even after a crash.
    atomic.write_text(path, json.dumps(manifest, indent=2) + "\n")
    return classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.classnames",
                                     description="Write make, model, body and year of each class into an exported "
                                                 "version's manifest.json.")
    parser.add_argument("folder", type=Path, help="a model version folder (artifacts/1)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the training data folder whose manifest.csv holds the original class names "
                             "(default: the one the manifest records, when it is here)")
    args = parser.parse_args(argv)
    try:
        classes = add_to_version(args.folder, args.data)
    except (OSError, ValueError, KeyError) as exc:
        print(f"classnames: {args.folder}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(classes)} classes into {args.folder / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
