"""Loading a model in the runtime that will serve it.

`choose_runtime` (choice.py) decides for each compiled package before it loads. What can still
go wrong afterwards (a package fails to load, to warm up, or to give the check photos their
recorded answers) is handled by choice.py's one fallback policy, `fall_back`: with --runtime auto,
the next runtime serves and one WARNING line says why; with --runtime compiled, the load fails
with that same line.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..manifest import CompiledPackage, Manifest
from ..onednn import effective_isa
from .choice import AT_LOAD, Host, RuntimeChoice, RuntimeChoiceError, choose_runtime, fall_back, package_problem
from .compiled import load_compiled
from .shapes import ShapedRunner, choose_shape, describe_passes, shape_name
from .torchscript import TorchScriptRunner, load_torchscript
from .weights import WeightsMismatch, WeightSource

log = logging.getLogger("whatcar")

# TorchScript's profiling executor settles on the second run of a shape; compiled code has
# nothing to profile, and its second pass already runs at full speed (measured per thread and
# batch size), so one warm-up pass each is enough for it.
WARM_UP_ROUNDS = {"compiled": 1, "torchscript": 2}


def warm_up_rounds(runner, passes: list[tuple[int, int]]) -> int:
    """Warm-up passes a thread runs at each batch size: enough for whatever runs its passes."""
    if not isinstance(runner, ShapedRunner):
        return WARM_UP_ROUNDS["torchscript"]
    return max(WARM_UP_ROUNDS["compiled" if runner.choose(batch, threads) else "torchscript"]
               for batch, threads in passes or [(1, 1)])


def cpu_model() -> str:
    """The CPU's model name as Linux reports it ("AMD EPYC", "Intel(R) Xeon(R) Processor"), or ""."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def this_host() -> Host:
    capability = torch.backends.cpu.get_cpu_capability()
    return Host(cpu_capability=capability, arch=platform.machine(), torch=torch.__version__,
                onednn_isa=effective_isa(capability), cpu_model=cpu_model())


def pass_over(requested: str, problem: str) -> None:
    """One compiled shape is not used, by the one fallback policy: a WARNING line with --runtime
    auto, the load's failure with --runtime compiled."""
    fall_back(requested, problem)
    log.warning("%s", problem)


@dataclass
class Opened:
    runner: object
    module: torch.jit.ScriptModule | None
    choice: RuntimeChoice


def open_runner(folder: Path, manifest: Manifest, classes: int, requested: str, plan,
                optimize: bool = True) -> Opened:
    """The runner for a verified artifact in `folder`: its compiled packages that can serve here,
    one per shape, and TorchScript for any pass none of them takes. `plan` (plan.PassPlan)
    says which passes the inference threads will run."""
    packages = manifest.compiled
    if requested == "torchscript" or not packages:
        try:
            choice = choose_runtime(requested, None, this_host())
        except RuntimeChoiceError as exc:
            raise ArtifactError(str(exc)) from None
        return Opened(*torchscript_runner(folder, manifest, classes, optimize), choice)
    host, passes = this_host(), plan.passes()
    loaded: dict[CompiledPackage, object] = {}
    problems: dict[CompiledPackage, str] = {}
    opened: list[WeightSource] = []

    def weights() -> WeightSource:
        """The version's one copy of the weights, read once for all its packages, when the first
        package that takes its constants at load needs it."""
        if not opened:
            extra = folder / manifest.weights_file if manifest.weights_file else None
            opened.append(WeightSource.open(folder / manifest.entry("model")[0], extra))
        return opened[0]

    def loader(package: CompiledPackage):
        return lambda: load_compiled(folder / package.file, package, manifest, classes, plan.callers(package.threads),
                                     weights)

    # Why each package cannot run on this host (None: it can), decided before any loads.
    unfit = {p: package_problem(p.requirements(), host) for p in packages}
    usable = [p for p in packages if unfit[p] is None]
    planned = {choose_shape(batch, threads, usable) for batch, threads in passes}
    later = {}
    try:
        for package in packages:
            problem = unfit[package]
            if problem is None and package not in planned and requested != "compiled":
                later[package] = loader(package)  # loaded when a pass first needs it
                continue
            if problem is None:
                try:
                    loaded[package] = loader(package)()
                except WeightsMismatch:
                    raise  # the version's files disagree: nothing of it is served
                except ArtifactError as exc:
                    problem = f"it failed to load: {exc}"
            if problem is not None:
                problems[package] = problem
                if requested == "compiled":
                    raise ArtifactError(f"--runtime compiled cannot be served: {named(package, packages)}{problem}")
        if not loaded:
            # No planned pass has a package that loads: those left for later must prove themselves now.
            for package, load in later.items():
                try:
                    loaded[package] = load()
                except WeightsMismatch:
                    raise
                except ArtifactError as exc:
                    problems[package] = f"it failed to load: {exc}"
            later = {}
        if not loaded:
            choice = fall_back(requested, "; ".join(named(p, packages) + problems[p] for p in packages))
            return Opened(*torchscript_runner(folder, manifest, classes, optimize), choice)
        for package, problem in problems.items():
            pass_over(requested, f"compiled {package.shape} not used, its passes go to the next runtime: {problem}")
        if any(p.static for p in packages):
            # A set of static shapes that lacks one of the passes planned here.
            for batch, threads in passes:
                chosen = choose_shape(batch, threads, list(loaded) + list(later))
                if chosen is None or not chosen.static:
                    pass_over(requested, f"no compiled b{batch}t{threads} package: passes of {batch} image(s) on "
                                         f"{threads} thread(s) run on {shape_name(chosen)}")
    except ArtifactError:
        for runner in loaded.values():
            runner.close()
        raise
    runner = ShapedRunner(loaded, lambda: torchscript_runner(folder, manifest, classes, optimize)[0], later)
    return Opened(runner, None, compiled_choice(runner, passes, host, manifest.weights_file))


def compiled_choice(runner: ShapedRunner, passes: list[tuple[int, int]], host: Host | None = None,
                    weights_file: str | None = None) -> RuntimeChoice:
    """The start-up line's account of a ShapedRunner: what runs each planned pass, and where the
    packages' weights came from (`weights_file`: the version's, if it has one)."""
    host = host or this_host()
    packages = runner.packages
    if not packages:
        # Only --runtime auto gets here: with compiled, the first shape dropped failed the load.
        return fall_back("auto", "no compiled shape is left to serve")
    if any(p.weights == AT_LOAD for p in packages):
        weights = (f"; weights stored once, taken at load from model.pt{f' and {weights_file}' if weights_file else ''}"
                   f" and packed here for oneDNN's {host.onednn_isa} kernels")
    else:
        weights = "; weights inside each package"
    return RuntimeChoice("compiled", f"{describe_passes(passes, packages)}; packages compiled by torch "
                                     f"{', '.join(sorted({p.torch for p in packages}))} for "
                                     f"{', '.join(sorted({p.cpu_capability for p in packages}))}, this host offers "
                                     f"{host.cpu_capability} (oneDNN kernels: {host.onednn_isa}) and runs torch "
                                     f"{host.torch}{weights}")


def named(package: CompiledPackage, packages: list[CompiledPackage]) -> str:
    """The package's shape before its problem, when there is more than one to tell apart."""
    return f"{package.shape}: " if len(packages) > 1 else ""


# Check photos each planned shape scores at load. The export proved every package on 24 photos
# against learn.predict, and the sha256 that the file is the one it proved; this shows that the
# package runs here as it did there. All six photos on all three shapes added 0.9 s to a cold start.
SHAPE_CHECKS = 2


def check_shapes(runner, pixels: torch.Tensor, expected: list[int], classes: int, requested: str,
                 passes: list[tuple[int, int]]) -> list[str]:
    """Give each compiled shape a planned pass runs on the first check photos (uint8 [N, 3, H, W])
    and compare each top-1 with the recorded one (`expected`, class indices); a shape that
    disagrees is dropped with one WARNING line (an ArtifactError with --runtime compiled).
    Returns the shapes dropped."""
    if not isinstance(runner, ShapedRunner) or not len(pixels):
        return []
    pixels, expected = pixels[:SHAPE_CHECKS], expected[:SHAPE_CHECKS]
    planned = {runner.choose(batch, threads) for batch, threads in passes}
    dropped = []
    for package in [p for p in runner.packages if p in planned and runner.runner_for(p) is not None]:
        size, got = package.min_batch, []
        with torch.inference_mode():
            for start in range(0, len(pixels), size):
                part = pixels[start:start + size]
                if len(part) < size:  # a static batch is filled with copies of its last photo
                    part = torch.cat([part, part[-1:].expand(size - len(part), *part.shape[1:])])
                got += runner.runner_for(package)(part.contiguous())[:len(pixels) - start, :classes] \
                    .argmax(dim=1).tolist()
        wrong = sum(g != e for g, e in zip(got, expected))
        if wrong:
            runner.drop(package)
            dropped.append(package.shape)
            pass_over(requested, f"compiled {package.shape} not used, its passes go to the next runtime: it named "
                                 f"{wrong} of {len(expected)} check photos differently from the export")
    return dropped


def torchscript_runner(folder: Path, manifest: Manifest, classes: int,
                       optimize: bool = True) -> tuple[TorchScriptRunner, torch.jit.ScriptModule]:
    module = load_torchscript(folder / manifest.entry("model")[0], manifest, classes, optimize)
    return TorchScriptRunner(module), module
