"""OpenVINO's CPU runtime on the served module (bench/onnx_export.py's ONNX), the benchmark's
reference for what this CPU does with the same model. A measuring stick only: the server is
torch alone. Runs in its own virtualenv (requirements/openvino.txt: openvino and numpy, no torch).

    python -m bench.openvino_worker MODEL.onnx HEIGHT WIDTH
    {"op": "forward", "threads": 1, "batch": 1, "count": 25, "seconds": 6}

Answers one JSON line per command, like bench/floor.py: wall and process-CPU milliseconds of
each forward pass. Precision is forced to f32: on CPUs with AMX or AVX512-BF16 the CPU plugin
otherwise runs in bf16, which would not be a float32 reference. A compiled model has a fixed
thread count, so one is compiled per thread count asked for.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        import numpy as np
        import openvino as ov
    except ImportError as exc:
        print(json.dumps({"skipped": f"OpenVINO cannot be imported here: {exc}"}), flush=True)
        return 0
    path, height, width = argv[0], int(argv[1]), int(argv[2])
    core = ov.Core()
    model = core.read_model(path)
    compiled: dict = {}

    def for_threads(threads: int):
        if threads not in compiled:
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
            network = core.compile_model(model, "CPU", config)
            compiled[threads] = (network, network.create_infer_request())
        return compiled[threads]

    network, _ = for_threads(1)
    print(json.dumps({"ready": True, "openvino": ov.get_version(),
                      "precision": str(network.get_property("INFERENCE_PRECISION_HINT"))}), flush=True)
    rng = np.random.default_rng(0)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        _, request = for_threads(command["threads"])
        images = rng.integers(0, 256, (command["batch"], 3, height, width), dtype=np.uint8)
        for _ in range(3):  # the first passes build kernels
            request.infer({0: images})
        wall, cpu = [], []
        deadline = time.perf_counter() + command["seconds"]
        while len(wall) < command["count"] and time.perf_counter() < deadline:
            c0, t0 = time.process_time(), time.perf_counter()
            request.infer({0: images})
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
        print(json.dumps({"forward_ms": wall, "cpu_ms": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
