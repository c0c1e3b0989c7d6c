"""The portable runtime: the traced, frozen TorchScript module (model.pt), loaded and run."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import ArtifactError, first_line
from ..manifest import Manifest
from .outputs import output_rows, probe


class TorchScriptRunner:
    """The TorchScript module as the inference threads call it."""

    def __init__(self, module: torch.jit.ScriptModule):
        self.module = module

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return output_rows(self.module(images))

    def ran(self, batch: int) -> str:
        return "torchscript"


def read_torchscript(model_path: Path) -> torch.jit.ScriptModule:
    """model.pt as TorchScript's loader reads it, or an ArtifactError saying why it cannot be."""
    try:
        with warnings.catch_warnings():
            # torch 2.14 flags jit.load as deprecated; it remains the loader for frozen archives.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(model_path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError or ValueError depending on the damage
        raise ArtifactError(f"{model_path} is not a loadable TorchScript module: {first_line(exc)}") from None


def load_torchscript(model_path: Path, manifest: Manifest, classes: int, optimize: bool) -> torch.jit.ScriptModule:
    module = read_torchscript(model_path)
    module.eval()
    if optimize:
        with torch.inference_mode(), warnings.catch_warnings():
            # Only in memory: a saved optimize_for_inference module does not load again. Done before
            # the probe, so the probe is also the optimised graph's first (slowest) pass.
            warnings.simplefilter("ignore", FutureWarning)
            try:
                module = torch.jit.optimize_for_inference(module)
            except Exception as exc:  # noqa: BLE001 - any failure here is a module the server cannot run
                raise ArtifactError(f"{model_path} cannot be optimised for inference: {first_line(exc)}") from None
    probe(TorchScriptRunner(module), model_path, manifest, classes)
    return module
