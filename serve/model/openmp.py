"""OpenMP's wait policy for the server: threads of a parallel team sleep between regions
(OMP_WAIT_POLICY=PASSIVE) instead of spinning first. libgomp reads it once, when torch loads
it, so it is set before the first `import torch` (serve/__main__.py, bench/floor.py).

Why: the solo thread runs a request's pass on every CPU, as a team of intra-op threads that
meets at a barrier after each parallel region (hundreds a pass), while the shared inference
threads and other processes want the same cores. With libgomp's default, a pass of the 352 px
model on two shared cores took 89-820 ms (compiled package) and 116-1043 ms (TorchScript)
depending on the load, against 34-38 ms and 43-53 ms with passive waits, in the same runs
(in-process and over HTTP at c=1, alternating; whatever else the machine ran weighed on both).
Throughput at c=8 did not drop (27.9 against 24.5 requests/s compiled, 19.5 against 19.5
TorchScript), and a cold start took 2.0 s instead of 6.8 s, the check photos being scored by the
solo thread. A single team with the machine to itself measured the same either way, within noise.
"""

from __future__ import annotations

import os

VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def passive_waits(environ: dict | None = None) -> bool:
    """Ask for passive waits unless the operator chose a policy; True if set. Call before torch loads."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in VARIABLES):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
