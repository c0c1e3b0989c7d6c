"""Loading a model in the runtime that will serve it, and the one fallback policy.

`choose_runtime` (choice.py) decides before anything loads. What can still go wrong afterwards
(the package fails to load, to warm up, or to give a check photo its recorded answer) is handled
by `fall_back` alone: with --runtime auto, TorchScript serves instead and the reason is kept;
with --runtime compiled, the load fails with that reason.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..manifest import Manifest
from .choice import Host, RuntimeChoice, RuntimeChoiceError, choose_runtime, fallback
from .compiled import load_compiled
from .torchscript import TorchScriptRunner, load_torchscript

# TorchScript's profiling executor settles on the second run of a shape; compiled code has
# nothing to profile, and its second pass already runs at full speed (measured per thread and
# batch size), so one warm-up pass each is enough for it.
WARM_UP_ROUNDS = {"compiled": 1, "torchscript": 2}


def this_host() -> Host:
    return Host(cpu_capability=torch.backends.cpu.get_cpu_capability(), arch=platform.machine(),
                torch=torch.__version__)


def fall_back(requested: str, problem: str) -> RuntimeChoice:
    """TorchScript instead of a compiled package that failed with `problem`, or, when the
    compiled runtime was asked for by name, an ArtifactError saying why it cannot serve."""
    if requested == "compiled":
        raise ArtifactError(f"--runtime compiled cannot be served: {problem}")
    return fallback(problem)


def open_runner(folder: Path, manifest: Manifest, classes: int, requested: str, runners: int,
                optimize: bool = True) -> tuple[object, torch.jit.ScriptModule | None, RuntimeChoice]:
    """(runner, TorchScript module or None, choice) for a verified artifact in `folder`.
    `runners` is how many threads will run passes at once (each compiled instance serves one)."""
    package = manifest.compiled
    try:
        choice = choose_runtime(requested, package.requirements() if package else None, this_host())
    except RuntimeChoiceError as exc:
        raise ArtifactError(str(exc)) from None
    if choice.name == "compiled":
        try:
            runner = load_compiled(folder / package.file, package, manifest, classes, runners)
            return runner, None, choice
        except ArtifactError as exc:
            choice = fall_back(requested, f"it failed to load: {exc}")
    return torchscript_runner(folder, manifest, classes, optimize) + (choice,)


def torchscript_runner(folder: Path, manifest: Manifest, classes: int,
                       optimize: bool = True) -> tuple[TorchScriptRunner, torch.jit.ScriptModule]:
    module = load_torchscript(folder / manifest.entry("model")[0], manifest, classes, optimize)
    return TorchScriptRunner(module), module
