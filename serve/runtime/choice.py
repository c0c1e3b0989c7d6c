"""Which runtime runs the model, decided once per load, and what every runtime hands back.

An artifact carries the traced TorchScript module (model.pt), which loads under other torch
releases, and may carry a compiled package (model.pt2, AOTInductor) of the same module, which
is machine code: faster, but only for the instruction sets and torch releases it was built
for. `choose_runtime` decides from the manifest and this host alone, before anything loads,
because a wrong package is not an exception but a dead process: an AVX-512 package on an
AVX2-only CPU is SIGILL, and neither torch nor the package checks. Pure functions, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNTIMES = ("auto", "compiled", "torchscript")
# A package's `weights` when it takes them at load, and its onednn_isa when they are packed
# then, by the oneDNN that runs it (serve/runtime/weights.py): a layout that fits every host.
AT_LOAD = PACKED_AT_LOAD = "at load"

# torch.backends.cpu.get_cpu_capability() on x86-64, weakest first. Each level includes the one
# before (an AVX512 CPU runs AVX2 code). ATEN_CPU_CAPABILITY can lower what a host reports.
X86_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


class RuntimeChoiceError(Exception):
    """`--runtime compiled` was asked for and the compiled package cannot serve; says why."""


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime serving a model, and the reason, for the start-up log line, /metadata and /metrics."""

    name: str  # "compiled" or "torchscript"
    reason: str

    def as_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class Host:
    """What the serving machine offers a compiled package."""

    cpu_capability: str  # torch.backends.cpu.get_cpu_capability()
    arch: str            # platform.machine()
    torch: str           # torch.__version__
    onednn_isa: str = ""  # the ISA oneDNN's kernels use here (serve/onednn.py); "" for the CPU's own
    cpu_model: str = ""  # the CPU's model name (loading.cpu_model()); "" when unknown


def capability_ok(package: str, host: str) -> bool:
    """Whether a host reporting `host` runs code compiled for `package`. Names outside the x86
    order (another architecture's, or one this server does not know) must match exactly."""
    if package in X86_CAPABILITIES and host in X86_CAPABILITIES:
        return X86_CAPABILITIES.index(host) >= X86_CAPABILITIES.index(package)
    return package == host


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a torch version string such as '2.14.1+cu130'; None if unreadable."""
    parts = version.split("+", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def torch_ok(compiled_with: str, serving_with: str, packed_at_load: bool = False) -> bool:
    """Whether a package compiled under one torch may run under another.

    The compiled library calls torch only through its C shim (aoti_torch_* functions, plus the
    C++ and OpenMP runtimes): a torch that lacks one of them fails the load itself, cleanly,
    because the library is opened with every symbol resolved at once. What the shim does not
    cover is the oneDNN weight blobs that freezing packs into the package, which the serving
    torch's own oneDNN reads back: a changed format there is not a load error. So only the
    torch that compiled the package and the releases next to it are accepted, the pair whatcar
    exports and serves with (2.14 and 2.13), both ways round, each of which is run on real
    photos every time: `make export` compiles with the serving 2.13 and checks every package's
    parity under the exporting 2.14, and `make test` loads packages that 2.14 compiled under
    2.13 (tests/cross). Anything else serves TorchScript until the model is re-exported.

    A package whose weights are packed at load (`packed_at_load`, serve/runtime/weights.py)
    carries no oneDNN blob: all it asks of the serving torch is the C shim, which PyTorch keeps
    for newer releases and which the load checks whole. Such packages are also accepted two
    releases on (docs/runtime.md, "Newer torch", has the measurement).
    """
    built, here = release(compiled_with), release(serving_with)
    if built is None or here is None or here[0] != built[0]:
        return False
    ahead = 2 if packed_at_load else 1
    return -1 <= here[1] - built[1] <= ahead


def choose_runtime(requested: str, package: dict | None, host: Host) -> RuntimeChoice:
    """The runtime to load, before loading anything.

    `requested` is auto, compiled or torchscript; `package` holds the manifest's facts about the
    compiled package (cpu_capability, arch, torch), or is None when the artifact has none. With
    `compiled`, a reason not to use the package raises RuntimeChoiceError instead of falling back.
    """
    if requested not in RUNTIMES:
        raise ValueError(f"unknown runtime {requested!r}; expected one of {', '.join(RUNTIMES)}")
    if requested == "torchscript":
        return RuntimeChoice("torchscript", "--runtime torchscript was asked for")
    problem = package_problem(package, host)
    if problem is None:
        return RuntimeChoice("compiled", f"{package['cpu_capability']} package compiled by torch {package['torch']}, "
                                         f"this host offers {host.cpu_capability} and runs torch {host.torch}")
    if requested == "compiled":
        raise RuntimeChoiceError(f"--runtime compiled cannot be served: {problem}")
    return fallback(problem)


def package_problem(package: dict | None, host: Host) -> str | None:
    """Why the compiled package cannot run here, or None when it can."""
    if package is None:
        return "the artifact has no compiled package"
    if package["arch"] != host.arch:
        return f"the compiled package is for {package['arch']} and this host is {host.arch}"
    if not capability_ok(package["cpu_capability"], host.cpu_capability):
        return (f"the compiled package needs a CPU with {package['cpu_capability']} and this one offers "
                f"{host.cpu_capability}")
    if not torch_ok(package["torch"], host.torch, package.get("weights") == AT_LOAD):
        return (f"the compiled package was built by torch {package['torch']}, and this server's torch "
                f"{host.torch} is not a release it is known to run on")
    built_for = package.get("built_for")
    if built_for and built_for != host.cpu_model:
        return (f"the compiled package was built by make compile for a {built_for} CPU and may use instructions "
                f"this {host.cpu_model or 'unknown'} CPU lacks")
    packed = package.get("onednn_isa")
    running = host.onednn_isa or host.cpu_capability
    if packed and packed != PACKED_AT_LOAD and packed != running:
        return (f"its weights are packed for oneDNN's {packed} kernels and oneDNN runs {running} ones here "
                f"(ONEDNN_MAX_CPU_ISA), which would repack them on every pass")
    return None


def fallback(problem: str) -> RuntimeChoice:
    return RuntimeChoice("torchscript", f"compiled package not used: {problem}")

