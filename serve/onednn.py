"""oneDNN's instruction-set cap for the process: the compiled packages' convolution weights are
packed at compile time in the layout oneDNN's AVX2 kernels read, so oneDNN must pick those
kernels when it runs them.

Left to itself, oneDNN picks the widest kernels the CPU has. On an AVX-512 CPU those want
another weight layout, and oneDNN then reorders the packed weights on every pass with its
generic reorder: measured on a 2-core AMD EPYC with AVX-512 (ONEDNN_VERBOSE=profile_exec, one
pass of the static batch-1 package on 1 thread), 44 of 79 ms went to 8 such reorders of the
1x1 convolutions' weights. With the cap the same pass took 27 ms (1.15x OpenVINO fp32 in the
same run), and TorchScript and the dynamic package lost nothing (docs/benchmark.md).

oneDNN reads ONEDNN_MAX_CPU_ISA once, when it first runs, so it is set before torch loads
(serve/__main__.py, serve/classify/__main__.py, the Ray actors, bench/floor.py), from the
manifest of the version the process starts with. An operator's own setting is kept, and a
version swapped in later with packages packed for another ISA has them passed over
(serve/runtime/choice.py), as does one whose packages `make compile` packed for the CPU's own
kernels while the process runs capped.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ArtifactError
from .manifest import Manifest
from .versions import VersionError, current_folder

VARIABLE = "ONEDNN_MAX_CPU_ISA"
# The ISA `make export` packed weights for (export/compiled.py), whatever CPU compiled, before
# packages took their weights at load.
PACKED_FOR = "AVX2"


def cap_isa(environ: dict | None = None, packed_for: str | None = PACKED_FOR) -> bool:
    """Cap oneDNN at PACKED_FOR when the packages to run are packed for it, unless the operator
    chose a cap; True if set. Call before torch loads. Packages `make compile` built for this
    CPU (`packed_for` its own capability), and those whose weights are packed at load
    (runtime.choice.PACKED_AT_LOAD, in whatever layout this process's oneDNN picks), want oneDNN's own choice,
    so no cap is set for them."""
    environ = os.environ if environ is None else environ
    if VARIABLE in environ or packed_for != PACKED_FOR:
        return False
    environ[VARIABLE] = PACKED_FOR
    return True


def packed_isa(folder: str | Path | None) -> str | None:
    """The ISA the static packages of the model folder's current version (or of an artifact
    folder) are packed for, from its manifest, before torch loads; PACKED_FOR when that cannot
    be told (the loader then says what is wrong with the folder)."""
    if folder is None:
        return PACKED_FOR
    try:
        packages = Manifest.read(current_folder(folder)).compiled
    except (ArtifactError, VersionError, OSError):
        return PACKED_FOR
    packed = {package.onednn_isa for package in packages} - {None}
    return packed.pop() if len(packed) == 1 else PACKED_FOR


def effective_isa(cpu_capability: str, environ: dict | None = None) -> str:
    """The ISA oneDNN's kernels use in this process, in the names packages record: the cap when
    one is set below what the CPU offers, else the CPU's own (torch's get_cpu_capability())."""
    environ = os.environ if environ is None else environ
    cap = environ.get(VARIABLE, "").strip().upper()
    if not cap or cap in ("ALL", "DEFAULT"):
        return cpu_capability
    if cap == "AVX2" or cpu_capability == "AVX2" and cap.startswith("AVX512"):
        return "AVX2"
    return cap
