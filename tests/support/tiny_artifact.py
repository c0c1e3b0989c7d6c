"""A tiny artifact folder made at test time: any labels, optional slowness, and a model that fails
on purpose on an all-white image, so that server tests can reach paths a real model never takes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from PIL import Image

from serve.model.manifest import MANIFEST, Check, Manifest, sha256_file
from serve.model.versions import VersionFolder

SIZE = 16


class TinyModel(torch.nn.Module):
    """Softmax over the mean of each colour channel: one class per channel, three in all."""

    def __init__(self, burn_rounds: int = 0):
        super().__init__()
        self.burn_rounds = burn_rounds
        self.weight = torch.nn.Parameter(torch.eye(192) * 0.5, requires_grad=False)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        means = images.float().mean(dim=(2, 3))
        if bool((means > 254.5).all()):
            raise RuntimeError("tiny model refuses all-white images")
        # Work that depends on the input, so freezing cannot fold it away: a slow model on demand.
        acc = means.sum() * torch.ones(192, 192) / 1000.0
        for _ in range(self.burn_rounds):
            acc = torch.tanh(acc @ self.weight)
        return torch.softmax(means / 64.0 + acc.mean() * 0.0, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities(images)


class FamiliarTinyModel(TinyModel):
    """The tiny model with a familiarity output too, as exports with acceptance thresholds have:
    the green channel's mean over 255."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.probabilities(images), images.float().mean(dim=(2, 3))[:, 1] / 255.0


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write a manifest as given, even one the server must refuse, with both checksums taken anew
    (so a test breaks exactly one thing)."""
    manifest["files"]["model"]["sha256"] = sha256_file(folder / "model.pt")
    manifest["files"]["labels"]["sha256"] = sha256_file(folder / "labels.txt")
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


COLOURS = [(250, 60, 10), (10, 250, 60), (60, 10, 250)]  # a check photo for each class, surest first


FAMILIARITY = {"name": "familiarity", "dtype": "float32", "shape": ["N"], "description": "green mean / 255"}


def write_tiny_artifact(folder: Path, labels: list[str] | None = None, burn_rounds: int = 0,
                        checks: bool = True, acceptance: dict | None = None, classes: list[dict] | None = None) -> Path:
    """With `acceptance` ({"min_probability": ..., "min_familiarity": ...}) the model also returns
    a familiarity and the manifest carries the thresholds, as an export with calibration does.
    `classes` ({"label", "make", "model", ...} per label) go into the manifest as the exporter
    writes them."""
    labels = labels or ["Alpha Coupe 2001", "Beta Van 2002", "Gamma Sedan 2003"]
    assert len(labels) == 3, "the tiny model has one class per colour channel"
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (TinyModel if acceptance is None else FamiliarTinyModel)(burn_rounds).eval()
        torch.jit.save(torch.jit.script(model), str(folder / "model.pt"))
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    steps = [{"op": "resize", "method": "squish", "height": SIZE, "width": SIZE, "resample": "bilinear",
              "pad_mode": "reflection"}]
    found = []
    if checks:
        (folder / "checks").mkdir(exist_ok=True)
        for i, colour in enumerate(COLOURS):
            name = f"checks/{i:02d}.png"
            Image.new("RGB", (24, 20), colour).save(folder / name)
            found.append(Check(name, sha256_file(folder / name), labels[i]))
    extra = {} if acceptance is None else {"extra_outputs": [FAMILIARITY], "acceptance": acceptance}
    if classes is not None:
        extra["classes"] = classes
    Manifest.create(folder, name="tiny-test", model_file="model.pt", labels_file="labels.txt",
                    num_classes=len(labels), steps=steps, checks=found, architecture="channel means (test model)",
                    versions={"torch": torch.__version__}, **extra).write(folder)
    return folder


def add_tiny_version(model_dir: Path, **options) -> str:
    """A tiny artifact added to a model folder as its next version, made current; returns its name."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = write_tiny_artifact(model_dir / ".staging", **options)
    models = VersionFolder(model_dir)
    version = models.add(staging)
    models.switch_to(version)
    return version
