"""Check photos: a few real photos kept inside the artifact with the top-1 the exported module
gave them, so that whoever loads the artifact later (the server on a reload, a deployment) can
prove the model it loaded is the one that was exported and checked.

The photos chosen are those the module is surest about, with the widest gap between its first
and second answer, so that rounding differences between torch releases or CPUs cannot flip
them, and they name different classes where possible, so a model that answers one class for
everything fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from serve.model.manifest import Check, sha256_file
from serve.model.preprocess import Preprocessor

from .torchscript import probabilities_of

COUNT = 6
FOLDER = "checks"
MAX_PIXELS = 200_000_000


def margins(module, preprocessor: Preprocessor, files: list[Path]) -> list[tuple[float, int, Path]]:
    """(gap between top-1 and top-2 probability, top-1 index, file) for each file."""
    out = []
    with torch.no_grad():
        for path in files:
            probabilities = probabilities_of(module(preprocessor(path.read_bytes()).unsqueeze(0)))[0]
            top = torch.topk(probabilities, 2)
            out.append((float(top.values[0] - top.values[1]), int(top.indices[0]), path))
    return out


def choose(scored: list[tuple[float, int, Path]], count: int) -> list[tuple[float, int, Path]]:
    """The `count` surest answers, one per class first, then the next surest of any class."""
    ordered = sorted(scored, key=lambda s: (-s[0], str(s[2])))
    chosen, classes = [], set()
    for entry in ordered:
        if entry[1] not in classes:
            chosen.append(entry)
            classes.add(entry[1])
    chosen += [entry for entry in ordered if entry not in chosen]
    return chosen[:count]


def write_checks(folder: Path, module, steps: list[dict], labels: list[str], files: list[Path],
                 count: int = COUNT) -> list[Check]:
    """Copy the chosen photos into `folder`/checks/ and return their manifest entries."""
    preprocessor = Preprocessor(steps, MAX_PIXELS)
    (folder / FOLDER).mkdir(exist_ok=True)
    checks = []
    for i, (_, top1, path) in enumerate(choose(margins(module, preprocessor, files), count)):
        name = f"{FOLDER}/{i:02d}{path.suffix.lower()}"
        shutil.copyfile(path, folder / name)
        checks.append(Check(name, sha256_file(folder / name), labels[top1]))
    return checks
