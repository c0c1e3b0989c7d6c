"""Where an exported artifact is verified and loaded: manifest, checksums, labels, TorchScript.

Nothing here unpickles Python objects: the model is a TorchScript archive and everything
else is JSON or text.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ArtifactError
from .manifest import MANIFEST, Manifest, sha256_file
from .preprocess import SpecError, validate_steps

__all__ = ["Artifact", "ArtifactError", "load_artifact", "read_labels", "sha256_file"]


def read_labels(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    labels = text.splitlines()
    if not labels or any(not label.strip() for label in labels):
        raise ArtifactError(f"{path}: labels must be one non-empty line per class")
    return labels


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def side_by_side(outputs) -> torch.Tensor:
    """A module's outputs as one [N, width] tensor: the probabilities first, then the columns of
    each extra output in the manifest's order (a module of format 1 returns the probabilities alone).
    One tensor per image keeps the inference stage unaware of what the columns mean."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    first, *rest = outputs
    return torch.cat([first, *(extra.reshape(first.shape[0], -1) for extra in rest)], dim=1)


class TorchScriptRunner:
    """The TorchScript module as the inference stage calls it: uint8 [N, 3, H, W] in, one
    [N, width] tensor out."""

    def __init__(self, module):
        self.module = module

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return side_by_side(self.module(batch))


@dataclass
class Artifact:
    folder: Path
    manifest: Manifest
    labels: list[str]
    module: torch.jit.ScriptModule
    load_seconds: float = 0.0

    @property
    def runner(self):
        return TorchScriptRunner(self.module)

    @property
    def name(self) -> str:
        return self.manifest.name or self.folder.name

    @property
    def sha256(self) -> str:
        return self.manifest.model_sha256

    @property
    def input_size(self) -> tuple[int, int]:
        return self.manifest.input_size

    @property
    def steps(self) -> list[dict]:
        return self.manifest.steps


def load_artifact(folder: str | Path, optimize: bool = True) -> Artifact:
    """Verify and load an artifact folder, or raise ArtifactError saying what is wrong."""
    started = time.perf_counter()
    folder = Path(folder)
    manifest = Manifest.read(folder)
    model_path = manifest.verified_file(folder, "model")
    labels = read_labels(manifest.verified_file(folder, "labels"))
    if len(labels) != manifest.num_classes:
        raise ArtifactError(f"labels file has {len(labels)} classes but the manifest says {manifest.num_classes}")
    try:
        height, width = validate_steps(manifest.steps)
    except SpecError as exc:
        raise ArtifactError(f"preprocessing in {folder / MANIFEST}: {exc}") from None
    if (height, width) != manifest.input_size:
        raise ArtifactError(f"preprocessing produces {height}x{width} but the model input is "
                            "{}x{}".format(*manifest.input_size))
    try:
        with warnings.catch_warnings():
            # torch 2.14 flags jit.load as deprecated; it remains the loader for frozen archives.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(model_path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError or ValueError depending on the damage
        raise ArtifactError(f"{model_path} is not a loadable TorchScript module: {first_line(exc)}") from None
    module.eval()
    probe = torch.zeros((1, 3, height, width), dtype=torch.uint8)
    with torch.inference_mode():
        try:
            if optimize:
                # Only in memory: a saved optimize_for_inference module does not load again. Done
                # before the probe, so the probe is also the optimised graph's first (slowest) pass.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    module = torch.jit.optimize_for_inference(module)
            out = side_by_side(module(probe))
        except Exception as exc:
            raise ArtifactError(f"{model_path} fails on a 1x3x{height}x{width} uint8 input: {first_line(exc)}") from None
    if out.ndim != 2 or out.shape[1] != manifest.output_width:
        extras = f" and {', '.join(manifest.extra_outputs)}" if manifest.extra_outputs else ""
        raise ArtifactError(f"model outputs shape {tuple(out.shape)} but there are {len(labels)} labels{extras}")
    return Artifact(folder=folder, manifest=manifest, labels=labels, module=module,
                    load_seconds=time.perf_counter() - started)
