"""Stanford Cars class names split into make, model, body style and year, once, at export.

    python -m export.classnames MODEL_VERSION_FOLDER [--data DATA]

writes those fields into an existing version's manifest.json as its `classes` list, for
versions exported before the exporter wrote it. The server only reads the list: names are
parsed here, where they can be tested against every known class.

Standard library only, so that it runs wherever the artifact is, with no training stack.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ops import atomic

# A name's words are split on spaces, so makes of more than one word must be known; hyphenated
# makes (Mercedes-Benz, Rolls-Royce) are one word already.
MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")

# Longest first, so that "Cargo Van" wins over "Van". "Wagon Van" is left out on purpose: Ford
# calls its passenger van the E-Series Wagon, so the model keeps "Wagon" and the body is "Van".
BODY_STYLES = ("Passenger Van", "Cargo Van", "Crew Cab", "Extended Cab", "Regular Cab", "Quad Cab", "Club Cab",
               "SuperCab", "Convertible", "Hatchback", "Minivan", "Coupe", "Sedan", "Wagon", "SUV", "Van")

MANIFEST_CSV = "manifest.csv"


class ClassNameError(ValueError):
    """A class name that does not end in a year or names no model."""


def parse(name: str) -> dict:
    """{"make", "model", "body", "year"} of a Stanford class name such as `BMW M3 Coupe 2012`.

    The body is None when the name carries none (`Chrysler 300 SRT-8 2010`). When the body
    style is not last but inside the model's words (`Infiniti G Coupe IPL 2012`), the model
    keeps every word and the body is still given.
    """
    words = name.split()
    if len(words) < 3 or not (len(words[-1]) == 4 and words[-1].isdigit()):
        raise ClassNameError(f"{name!r} is not '<make> <model> [body] <year>'")
    year, words = int(words[-1]), words[:-1]
    make_words = 1
    for make in MULTI_WORD_MAKES:
        if words[:len(make.split())] == make.split():
            make_words = len(make.split())
    make, rest = " ".join(words[:make_words]), words[make_words:]
    body = None
    for style in BODY_STYLES:
        size = len(style.split())
        if len(rest) > size and rest[-size:] == style.split():
            body, rest = style, rest[:-size]
            break
    if body is None:
        body = inner_body(rest)
    if not rest:
        raise ClassNameError(f"{name!r} names no model after the make {make!r}")
    return {"make": make, "model": " ".join(rest), "body": body, "year": year}


def inner_body(words: list[str]) -> str | None:
    """The body style named after the model's first word, when none ends the name."""
    for start in range(1, len(words)):
        for style in BODY_STYLES:
            size = len(style.split())
            if words[start:start + size] == style.split():
                return style
    return None


def folder_names(data: Path | None) -> dict[str, str]:
    """Folder label -> Stanford name, from the data folder's manifest.csv (empty without one).

    Folder names cannot hold `/`, so `Ram C/V Cargo Van Minivan 2012` is stored under
    `Ram C-V ...`; the csv keeps the original.
    """
    if data is None or not (Path(data) / MANIFEST_CSV).is_file():
        return {}
    names = {}
    with open(Path(data) / MANIFEST_CSV, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            folder = row.get("file", "").split("/", 1)[0]
            if folder and row.get("class_name"):
                names.setdefault(folder, row["class_name"])
    return names


def display_names(labels: list[str], data: Path | None = None) -> list[str]:
    """The name to show for each folder label, the folder name itself when the csv lacks it."""
    names = folder_names(data)
    return [names.get(label, label) for label in labels]


def class_fields(labels: list[str], data: Path | None = None) -> list[dict]:
    """The manifest's `classes` list: one entry per output, in labels order."""
    return [{"label": label, "name": name, **parse(name)} for label, name in zip(labels, display_names(labels, data))]


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
