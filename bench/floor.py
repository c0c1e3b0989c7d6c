"""The floor: what this machine can do with the served model and no HTTP at all.

Decode, preprocess and forward pass in one process, through the server's own code (the
Scorer's preprocessing and the artifact loaded exactly as the server loads it). Prints one
JSON object:

    python -m bench.floor --model-dir artifacts --image jpeg400=PATH [--image NAME=PATH ...]

Single stream: one image after another, with 1 and with 2 intra-op threads. Two cores: a few
ways to keep both busy (two single-threaded streams, batched streams, one two-threaded batched
stream); the best of them is the throughput a server on this machine could hope for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from serve.artifact import load_artifact  # noqa: E402
from serve.config import Config  # noqa: E402
from serve.cpus import available_cpus  # noqa: E402
from serve.scoring import Scorer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def single_stream(scorer: Scorer, module, data: bytes, threads: int, count: int, seconds: float) -> dict:
    """Latency of one image at a time, split into preprocessing and forward pass."""
    result = {}

    def work():
        torch.set_num_threads(threads)
        pre, fwd, total = [], [], []
        with torch.inference_mode():
            for _ in range(3):
                module(scorer.preprocess(data).unsqueeze(0))
            deadline = time.perf_counter() + seconds
            while len(total) < count and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                pixels = scorer.preprocess(data)
                t1 = time.perf_counter()
                module(pixels.unsqueeze(0))
                t2 = time.perf_counter()
                pre.append((t1 - t0) * 1000)
                fwd.append((t2 - t1) * 1000)
                total.append((t2 - t0) * 1000)
        result.update(count=len(total), p50_ms=statistics.median(total), mean_ms=statistics.fmean(total),
                      p95_ms=percentile(total, 95), preprocess_p50_ms=statistics.median(pre),
                      forward_p50_ms=statistics.median(fwd))

    # A fresh thread, like a server worker, so its thread setting starts from the defaults.
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return result


def streams(scorer: Scorer, module, data: bytes, count: int, threads: int, batch: int, seconds: float) -> dict:
    """`count` threads, each decoding `batch` images and running them as one forward pass."""
    done = [0] * count
    start = threading.Barrier(count + 1)
    stop = threading.Event()

    def work(i: int):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            module(torch.stack([scorer.preprocess(data) for _ in range(batch)]))
            start.wait()
            while not stop.is_set():
                module(torch.stack([scorer.preprocess(data) for _ in range(batch)]))
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
    return {"streams": count, "torch_threads": threads, "batch": batch, "images": images,
            "seconds": round(elapsed, 3), "images_per_s": images / elapsed}


# (streams, intra-op threads per stream, batch) tried for the two-core figure.
LAYOUTS = [(2, 1, 1), (2, 1, 4), (1, 2, 1), (1, 2, 8)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--image", action="append", required=True, metavar="NAME=PATH",
                   help="an input to time single-stream; the first one is also used for throughput")
    p.add_argument("--count", type=int, default=60, help="single-stream images per input and thread count")
    p.add_argument("--seconds", type=float, default=8.0, help="time budget for each measurement")
    args = p.parse_args(argv)

    config = Config(model_dir=args.model_dir)
    artifact = load_artifact(config.model_dir)
    module = artifact.module
    scorer = Scorer(artifact, None, config.max_image_pixels)
    inputs = {}
    for item in args.image:
        name, _, path = item.partition("=")
        inputs[name] = Path(path).read_bytes()
    cpus = available_cpus()
    result = {"model": artifact.name, "input_size": list(artifact.input_size), "cpus": cpus,
              "torch": torch.__version__, "single": {}, "throughput": []}
    for name, data in inputs.items():
        result["single"][name] = {}
        for threads in sorted({1, cpus}):
            # Big inputs are slow to decode: fewer of them keep the budget.
            count = args.count if len(data) < 1 << 20 else max(5, args.count // 4)
            result["single"][name][f"threads{threads}"] = single_stream(scorer, module, data, threads, count,
                                                                        args.seconds)
    first = next(iter(inputs.values()))
    for count, threads, batch in LAYOUTS:
        if count * threads > cpus:
            continue
        result["throughput"].append(streams(scorer, module, first, count, threads, batch, args.seconds))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
