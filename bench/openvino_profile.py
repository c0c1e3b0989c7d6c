"""OpenVINO fp32's per-layer performance counters for one pass of an ONNX model, grouped into the
layer kinds bench/profile.py uses (run in the OpenVINO virtualenv: no torch there).

    python -m bench.openvino_profile MODEL.onnx THREADS RUNS

Prints one JSON line: the median wall time of RUNS passes, and {kind: {ms, count}} of the last.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def kind_of_layer(node_type: str, name: str) -> str:
    kind = node_type.lower()
    if kind == "convolution":
        return "dense convolutions (the 3x3 stem, 1x1)"
    if kind == "groupconvolution":
        return "depthwise convolutions"
    if kind in ("fullyconnected", "matmul"):
        return "fully connected"
    if kind == "reorder":
        return "other reorders"
    if kind in ("pooling", "reduce", "reducemean", "avgpool", "maxpool"):
        return "pooling"
    if kind in ("eltwise", "subtract", "multiply", "divide", "add", "clamp", "convert", "softmax"):
        return "elementwise"
    return "other"


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import openvino as ov

    path, threads, runs = (sys.argv[1:] if argv is None else argv)[:3]
    core = ov.Core()
    network = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
        "NUM_STREAMS": 1, "PERF_COUNT": True})
    request = network.create_infer_request()
    shape = [1 if d.is_dynamic else d.get_length() for d in network.input(0).get_partial_shape()]
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for _ in range(3):
        request.infer({0: images})
    wall = []
    for _ in range(int(runs)):
        t0 = time.perf_counter()
        request.infer({0: images})
        wall.append((time.perf_counter() - t0) * 1000)
    kinds: dict[str, dict] = {}
    for info in request.get_profiling_info():
        ms = info.real_time.total_seconds() * 1000
        if ms <= 0:
            continue
        kind = kinds.setdefault(kind_of_layer(info.node_type, info.node_name), {"ms": 0.0, "count": 0})
        kind["ms"] += ms
        kind["count"] += 1
    print(json.dumps({"wall_ms": statistics.median(wall), "kinds": kinds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
