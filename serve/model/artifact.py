"""Where an exported artifact is verified and loaded: manifest, checksums, labels, and the model
in the runtime serve/model/runtime/ picks (the compiled package, or TorchScript).

Nothing here unpickles Python objects: the model is a TorchScript archive or a compiled
library in a zip, and everything else is JSON or text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ArtifactError, first_line
from .manifest import MANIFEST, Acceptance, Manifest, sha256_file
from .preprocess import SpecError, validate_steps
from .runtime.choice import RuntimeChoice, fall_back
from .runtime.loading import check_shapes, compiled_choice, open_runner, torchscript_runner
from .runtime.plan import PassPlan

__all__ = ["Artifact", "ArtifactError", "first_line", "load_artifact", "read_labels", "sha256_file"]


def read_labels(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    labels = text.splitlines()
    if not labels or any(not label.strip() for label in labels):
        raise ArtifactError(f"{path}: labels must be one non-empty line per class")
    return labels


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
    # The TorchScript module, when it is what serves (None when compiled packages do).
    module: torch.jit.ScriptModule | None = None
    load_seconds: float = 0.0
    # Which version of its model folder this is (serve/model/versions.py).
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

    def switch_to_torchscript(self, requested: str, problem: str, optimize: bool = True) -> RuntimeChoice:
        """Serve TorchScript instead of the compiled packages, which failed after loading (a warm-up
        or a check photo), as the one fallback policy (runtime/choice.py's fall_back) allows;
        returns the new choice. The artifact was verified when it loaded."""
        choice = fall_back(requested, problem)
        self.close()
        self.runner, self.module = torchscript_runner(self.folder, self.manifest, len(self.labels), optimize)
        self.runtime = choice
        return choice

    def prove_shapes(self, pixels: torch.Tensor, expected: list[int], requested: str,
                     passes: list[tuple[int, int]]) -> list[str]:
        """Give each compiled shape one of `passes` runs on the check photos' pixels and compare its
        top-1 with `expected` (class indices); a shape that disagrees leaves its passes to the next
        runtime, and the runtime's account says so. Returns the shapes dropped."""
        dropped = check_shapes(self.runner, pixels, expected, len(self.labels), requested, passes)
        if dropped:
            self.runtime = compiled_choice(self.runner, passes, weights_file=self.manifest.weights_file)
        return dropped

    def close(self) -> None:
        """Let go of the model's code and weights now (a compiled package's instances are freed
        here; TorchScript's when the last reference goes)."""
        closer = getattr(self.runner, "close", None)
        if closer is not None:
            closer()
        self.runner = self.module = None


def load_artifact(folder: str | Path, optimize: bool = True, runtime: str = "auto", plan: PassPlan = PassPlan(),  # noqa: B008 - frozen
                  version: str = "1") -> Artifact:
    """Verify and load an artifact folder, or raise ArtifactError saying what is wrong.

    Every file the manifest lists is checked against its sha256 first, the compiled package too
    whichever runtime serves. `runtime` (auto, compiled, torchscript) picks what is loaded, see
    serve/model/runtime/; with auto, a compiled package that cannot serve here leaves its passes to
    the next runtime, and a WARNING line says why. `plan` says which passes the inference
    threads will run, so that each gets its compiled shape and each thread an instance.
    """
    started = time.perf_counter()
    folder = Path(folder)
    manifest = Manifest.read(folder)
    manifest.verified_file(folder, "model")
    labels = read_labels(manifest.verified_file(folder, "labels"))
    manifest.verified_packages(folder)  # whichever runtime serves
    if manifest.has_weights_file:
        manifest.verified_file(folder, "weights")
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
    opened = open_runner(folder, manifest, len(labels), runtime, plan, optimize)
    return Artifact(folder=folder, manifest=manifest, labels=labels, runner=opened.runner, runtime=opened.choice,
                    extra_outputs=extra_outputs, acceptance=acceptance, module=opened.module,
                    load_seconds=time.perf_counter() - started, version=version)
