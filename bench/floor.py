"""The floor: what this machine can do with the served model and no HTTP at all.

Decode, preprocess and forward pass in one process, through the server's own code (its
Preprocessor, and the artifact loaded exactly as the server loads it).

Single stream: one image after another, on 1 or more intra-op threads. Streams: several
threads at once, each decoding `batch` images and scoring them as one batch; the best of a few
layouts is the throughput a server on this machine could hope for.

`python -m bench` keeps one of these processes running and sends it one JSON command per line
on stdin, so that floor and server are measured in alternation and share whatever else the
machine is doing; each answer is one JSON line on stdout:

    python -m bench.floor --model-dir artifacts --image jpeg400=PATH [--image NAME=PATH ...]
    {"op": "single", "input": "jpeg400", "threads": 2, "count": 20, "seconds": 5}
    {"op": "streams", "input": "jpeg400", "streams": 2, "threads": 1, "batch": 1, "seconds": 4}
    {"op": "forward", "runtime": "compiled", "input": "jpeg400", "threads": 1, "batch": 1, "count": 25, "seconds": 6}

The forward op times passes alone in either runtime the artifact offers (the compiled package
and TorchScript, both loaded as the server loads them), for the comparison with OpenVINO
(bench/openvino_worker.py) on the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from serve.malloc import keep_freed_memory  # noqa: E402 - after the NumPy warning filter, before torch loads
from serve.onednn import cap_isa, packed_isa  # noqa: E402 - after the NumPy warning filter, before torch loads
from serve.openmp import passive_waits  # noqa: E402 - after the NumPy warning filter, before torch loads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--image", action="append", required=True, metavar="NAME=PATH", help="an input, by name")
    return p.parse_args(argv)


passive_waits()  # as the server does, before torch loads
cap_isa(packed_for=packed_isa(parse_args().model_dir if __name__ == "__main__" else None))
keep_freed_memory()

import torch  # noqa: E402 - torch loads only once the settings above are in place

from serve.artifact import ArtifactError, load_artifact  # noqa: E402 - torch loads only once the settings above are in place
from serve.config import Config  # noqa: E402 - torch loads only once the settings above are in place
from serve.cpus import available_cpus  # noqa: E402 - torch loads only once the settings above are in place
from serve.preprocess import Preprocessor  # noqa: E402 - torch loads only once the settings above are in place
from serve.scheduler import PassPlan  # noqa: E402 - torch loads only once the settings above are in place
from serve.versions import current_folder  # noqa: E402 - torch loads only once the settings above are in place

from .report import floor_layouts  # noqa: E402 - torch loads only once the settings above are in place


def in_fresh_thread(fn):
    """Run fn on a new thread, like a server's worker, so its thread setting starts afresh."""
    out = {}

    def run():
        torch.get_num_threads()  # adopt the process-wide count first, then set this thread's own
        out["result"] = fn()

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return out["result"]


def single_stream(preprocess: Preprocessor, module, data: bytes, threads: int, count: int, seconds: float) -> dict:
    """Latencies of one image at a time, split into preprocessing and forward pass."""

    def work():
        torch.set_num_threads(threads)
        pre, fwd = [], []
        with torch.inference_mode():
            for _ in range(3):
                module(preprocess(data).unsqueeze(0))
            deadline = time.perf_counter() + seconds
            while len(pre) < count and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                pixels = preprocess(data)
                t1 = time.perf_counter()
                module(pixels.unsqueeze(0))
                t2 = time.perf_counter()
                pre.append((t1 - t0) * 1000)
                fwd.append((t2 - t1) * 1000)
        return {"threads": threads, "preprocess_ms": pre, "forward_ms": fwd,
                "latencies_ms": [a + b for a, b in zip(pre, fwd)]}

    return in_fresh_thread(work)


def forward_passes(runner, pixels: torch.Tensor, threads: int, batch: int, count: int, seconds: float) -> dict:
    """Wall and process-CPU milliseconds of forward passes alone, on `batch` copies of one
    preprocessed image, on a fresh thread of `threads` intra-op threads."""

    def work():
        torch.set_num_threads(threads)
        images = pixels.unsqueeze(0).repeat(batch, 1, 1, 1)
        wall, cpu = [], []
        with torch.inference_mode():
            for _ in range(3):
                runner(images)
            deadline = time.perf_counter() + seconds
            while len(wall) < count and time.perf_counter() < deadline:
                c0, t0 = time.process_time(), time.perf_counter()
                runner(images)
                wall.append((time.perf_counter() - t0) * 1000)
                cpu.append((time.process_time() - c0) * 1000)
        return {"forward_ms": wall, "cpu_ms": cpu}

    return in_fresh_thread(work)


def passes(cpus: int) -> PassPlan:
    """The passes measured here: streams of one thread each, and one stream on every CPU."""
    return PassPlan(workers=cpus, torch_threads=1, micro_batch=1, solo_threads=cpus if cpus > 1 else 0)


def forward_runners(folder, served, cpus: int) -> tuple[dict, dict]:
    """Each runtime the artifact offers on this host, loaded as the server loads it, for forward
    passes side by side; and why any is missing."""
    runners, missing = {served.runtime.name: served.runner}, {}
    for runtime in ("compiled", "torchscript"):
        if runtime in runners:
            continue
        try:
            runners[runtime] = load_artifact(folder, runtime=runtime, plan=passes(cpus)).runner
        except ArtifactError as exc:
            missing[runtime] = str(exc)
    return runners, missing


def streams(preprocess: Preprocessor, module, data: bytes, count: int, threads: int, batch: int,
            seconds: float) -> dict:
    """`count` threads, each decoding `batch` images and running them as one forward pass."""
    done = [0] * count
    start = threading.Barrier(count + 1)
    stop = threading.Event()

    def work(i: int):
        torch.get_num_threads()
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for _ in range(2):
                module(torch.stack([preprocess(data) for _ in range(batch)]))
            start.wait()
            while not stop.is_set():
                module(torch.stack([preprocess(data) for _ in range(batch)]))
                done[i] += batch

    workers = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    images = sum(done)
    return {"streams": count, "threads": threads, "batch": batch, "images": images, "seconds": elapsed,
            "images_per_s": images / elapsed}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    config = Config(model_dir=args.model_dir)
    folder = current_folder(config.model_dir)
    # The runtime the server picks, with the same setting.
    artifact = load_artifact(folder, runtime=os.environ.get("WHATCAR_RUNTIME", "auto"),
                             plan=passes(available_cpus()))
    runners, missing = forward_runners(folder, artifact, available_cpus())
    preprocess = Preprocessor(artifact.steps, config.max_image_pixels)
    inputs = {}
    for item in args.image:
        name, _, path = item.partition("=")
        inputs[name] = Path(path).read_bytes()
    print(json.dumps({"ready": True, "model": artifact.name, "cpus": available_cpus(), "torch": torch.__version__,
                      "layouts": floor_layouts(available_cpus()), "runtime": artifact.runtime.as_dict(),
                      "input_size": list(artifact.input_size), "forward_runtimes": sorted(runners),
                      "forward_missing": missing}),
          flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        data = inputs[command["input"]]
        if command["op"] == "single":
            answer = single_stream(preprocess, artifact.runner, data, command["threads"], command["count"],
                                   command["seconds"])
        elif command["op"] == "forward":
            runner = runners.get(command["runtime"])
            if runner is None:
                answer = {"skipped": missing.get(command["runtime"], f"no runtime {command['runtime']!r}")}
            else:
                answer = forward_passes(runner, preprocess(data), command["threads"], command["batch"],
                                        command["count"], command["seconds"])
        elif command["op"] == "streams":
            answer = streams(preprocess, artifact.runner, data, command["streams"], command["threads"],
                             command["batch"], command["seconds"])
        else:
            answer = {"error": f"unknown op {command['op']!r}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
