"""The fastai baseline: `learn.predict` on the same learner and images, timed per image.

Runs in the training virtualenv (fastai is never installed beside the server) and prints one
JSON object on stdout, which `python -m bench` reads:

    .venv/train/bin/python -m bench.fastai_baseline --learner models/export.pkl IMAGE... [--count N]

This is how a fastai user serves a model by hand: one `learn.predict(path)` per upload, decode
included, with torch's default thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fastai_baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, nargs="+", help="image files, each timed separately")
    p.add_argument("--learner", type=Path, default=Path("models/export.pkl"))
    p.add_argument("--count", type=int, default=20, help="timed predictions per image (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=30.0, help="time budget per image (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    if not args.learner.is_file():
        print(json.dumps({"skipped": f"learner {args.learner} not found"}))
        return 0
    started = time.perf_counter()
    import torch

    from export.learner import LearnerError, load
    try:
        learn = load(args.learner)
    except LearnerError as exc:
        print(json.dumps({"skipped": str(exc)}))
        return 0
    result = {"learner": str(args.learner), "load_seconds": round(time.perf_counter() - started, 2),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "images": {}}
    for path in args.images:
        times, label = [], None
        with warnings.catch_warnings(), learn.no_bar():
            warnings.simplefilter("ignore")
            for _ in range(args.warmup):
                label = str(learn.predict(path)[0])
            deadline = time.perf_counter() + args.seconds
            while len(times) < args.count and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                learn.predict(path)
                times.append((time.perf_counter() - t0) * 1000)
        result["images"][path.name] = {"count": len(times), "p50_ms": statistics.median(times),
                                       "mean_ms": statistics.fmean(times), "top1": label}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
