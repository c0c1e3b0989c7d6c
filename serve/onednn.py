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
(serve/__main__.py, serve/classify/__main__.py, the Ray actors, bench/floor.py). An operator's
own setting is kept: serve/runtime/choice.py then passes over packages packed for another ISA.
"""

from __future__ import annotations

import os

VARIABLE = "ONEDNN_MAX_CPU_ISA"
# The ISA whatcar packs weights for (export/compiled.py), whatever CPU compiles.
PACKED_FOR = "AVX2"


def cap_isa(environ: dict | None = None) -> bool:
    """Cap oneDNN at PACKED_FOR unless the operator chose a cap; True if set. Call before torch loads."""
    environ = os.environ if environ is None else environ
    if VARIABLE in environ:
        return False
    environ[VARIABLE] = PACKED_FOR
    return True


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
