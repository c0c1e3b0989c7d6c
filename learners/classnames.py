"""Stanford Cars class names split into make, model, body style and year.

Training reads them to weigh mistakes within a make (train/makeloss.py); the export writes them
into the manifest as its `classes` list (export/classnames.py). The server only reads that list:
names are parsed here, where they can be tested against every known class.

Standard library only, so that it runs wherever the artifact is, with no training stack.
"""

from __future__ import annotations

import csv
from pathlib import Path

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
