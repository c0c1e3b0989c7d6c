"""Where an exported artifact is verified and loaded: manifest, checksums, labels, and the model
in the runtime serve/runtime.py picks (the compiled package, or TorchScript).

Nothing here unpickles Python objects: the model is a TorchScript archive or a compiled
library in a zip, and everything else is JSON or text.
"""

from __future__ import annotations

import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .compiled import CompiledModel, CompiledRunner, PackageError
from .errors import ArtifactError
from .inference import output_rows
from .manifest import MANIFEST, Acceptance, CompiledPackage, Manifest, sha256_file
from .preprocess import SpecError, validate_steps
from .runtime import Host, RuntimeChoice, RuntimeChoiceError, choose_runtime, fallback

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


@dataclass
class Artifact:
    folder: Path
    manifest: Manifest
    labels: list[str]
    # What the inference threads call: uint8 [N, 3, H, W] in, float [N, width] out.
    runner: Callable[[torch.Tensor], torch.Tensor]
    runtime: RuntimeChoice
    # What the module returns after the probabilities, and when its top answer counts: read
    # from the manifest once, at load, so that a malformed block is refused then.
    extra_outputs: list[str] = field(default_factory=list)
    acceptance: Acceptance | None = None
    # The TorchScript module, when it is what serves (None when the compiled package does).
    module: torch.jit.ScriptModule | None = None
    load_seconds: float = 0.0
    # Which version of its model folder this is (serve/versions.py).
    version: str = "1"

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

    def fall_back(self, problem: str, optimize: bool = True) -> RuntimeChoice:
        """Serve TorchScript instead of the compiled package, which failed after loading (a warm-up
        or a check photo); returns the new choice. The artifact was verified when it loaded."""
        self.close()
        self.module = load_torchscript(self.folder / self.manifest.entry("model")[0], self.manifest, len(self.labels),
                                       optimize)
        self.runner = TorchScriptRunner(self.module)
        self.runtime = fallback(problem)
        return self.runtime

    def close(self) -> None:
        """Let go of the model's code and weights now (a compiled package's instances are freed
        here; TorchScript's when the last reference goes)."""
        closer = getattr(self.runner, "close", None)
        if closer is not None:
            closer()
        self.runner = self.module = None


class TorchScriptRunner:
    """The TorchScript module as the inference threads call it."""

    def __init__(self, module: torch.jit.ScriptModule):
        self.module = module

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return output_rows(self.module(images))


def this_host() -> Host:
    return Host(cpu_capability=torch.backends.cpu.get_cpu_capability(), arch=platform.machine(),
                torch=torch.__version__)


def load_artifact(folder: str | Path, optimize: bool = True, runtime: str = "auto", runners: int = 1,
                  version: str = "1") -> Artifact:
    """Verify and load an artifact folder, or raise ArtifactError saying what is wrong.

    Every file the manifest lists is checked against its sha256 first, the compiled package too
    whichever runtime serves. `runtime` (auto, compiled, torchscript) picks what is loaded, see
    serve/runtime.py; with auto, a compiled package that cannot serve here leaves TorchScript
    serving, and `Artifact.runtime.reason` says why. `runners` is how many threads will run
    passes at once (each needs a compiled model instance of its own).
    """
    started = time.perf_counter()
    folder = Path(folder)
    manifest = Manifest.read(folder)
    model_path = manifest.verified_file(folder, "model")
    labels = read_labels(manifest.verified_file(folder, "labels"))
    package = manifest.compiled
    package_path = manifest.verified_file(folder, "compiled") if package is not None else None
    extra_outputs, acceptance = manifest.extra_outputs, manifest.acceptance
    if len(labels) != manifest.num_classes:
        raise ArtifactError(f"labels file has {len(labels)} classes but the manifest says {manifest.num_classes}")
    classes = manifest.classes
    if classes is not None:
        for index, (label, car) in enumerate(zip(labels, classes)):
            if car.label != label:
                raise ArtifactError(f"{folder / MANIFEST}: classes[{index}] is {car.label!r} but line {index + 1} of "
                                    f"the labels file is {label!r}")
    try:
        height, width = validate_steps(manifest.steps)
    except SpecError as exc:
        raise ArtifactError(f"preprocessing in {folder / MANIFEST}: {exc}") from None
    if (height, width) != manifest.input_size:
        raise ArtifactError(f"preprocessing produces {height}x{width} but the model input is "
                            "{}x{}".format(*manifest.input_size))
    try:
        choice = choose_runtime(runtime, package.requirements() if package else None, this_host())
    except RuntimeChoiceError as exc:
        raise ArtifactError(str(exc)) from None
    module = runner = None
    if choice.name == "compiled":
        try:
            runner = load_compiled(package_path, package, manifest, len(labels), runners)
        except ArtifactError as exc:
            if runtime == "compiled":
                raise ArtifactError(f"--runtime compiled cannot be served: {exc}") from None
            choice = fallback(f"it failed to load: {exc}")
    if runner is None:
        module = load_torchscript(model_path, manifest, len(labels), optimize)
        runner = TorchScriptRunner(module)
    return Artifact(folder=folder, manifest=manifest, labels=labels, runner=runner, runtime=choice,
                    extra_outputs=extra_outputs, acceptance=acceptance, module=module,
                    load_seconds=time.perf_counter() - started, version=version)


def load_torchscript(model_path: Path, manifest: Manifest, classes: int, optimize: bool) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # torch 2.14 flags jit.load as deprecated; it remains the loader for frozen archives.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(model_path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError or ValueError depending on the damage
        raise ArtifactError(f"{model_path} is not a loadable TorchScript module: {first_line(exc)}") from None
    module.eval()
    if optimize:
        with torch.inference_mode(), warnings.catch_warnings():
            # Only in memory: a saved optimize_for_inference module does not load again. Done before
            # the probe, so the probe is also the optimised graph's first (slowest) pass.
            warnings.simplefilter("ignore", FutureWarning)
            try:
                module = torch.jit.optimize_for_inference(module)
            except Exception as exc:
                raise ArtifactError(f"{model_path} cannot be optimised for inference: {first_line(exc)}") from None
    probe(TorchScriptRunner(module), model_path, manifest, classes)
    return module


def load_compiled(path: Path, package: CompiledPackage, manifest: Manifest, classes: int,
                  runners: int) -> CompiledRunner:
    height, width = manifest.input_size
    try:
        # load_artifact has checked the file against this sha256.
        model = CompiledModel(path, runners, sha256=package.sha256)
    except PackageError as exc:
        raise ArtifactError(str(exc)) from None
    runner = CompiledRunner(model, height, width, package.min_batch, package.max_batch)
    try:
        probe(runner, path, manifest, classes)
    except ArtifactError:
        runner.close()
        raise
    return runner


def probe(runner, path: Path, manifest: Manifest, classes: int) -> None:
    """One pass on a blank image: the model runs and answers one row per class."""
    height, width = manifest.input_size
    with torch.inference_mode():
        try:
            out = runner(torch.zeros((1, 3, height, width), dtype=torch.uint8))
        except Exception as exc:
            raise ArtifactError(f"{path} fails on a 1x3x{height}x{width} uint8 input: {first_line(exc)}") from None
    if out.ndim != 2 or out.shape[1] != manifest.output_width:
        extras = f" and {', '.join(manifest.extra_outputs)}" if manifest.extra_outputs else ""
        raise ArtifactError(f"{path.name}: model outputs shape {tuple(out.shape)} but there are {classes} labels{extras}")
