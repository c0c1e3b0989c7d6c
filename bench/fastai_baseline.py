"""The fastai baseline: `learn.predict` on the same learner and images, timed per image.

Runs in the training virtualenv (fastai is never installed beside the server). This is how a
fastai user serves a model by hand: one `learn.predict(path)` per upload, decode included, with
torch's default thread count.

`python -m bench` keeps it running and sends one JSON command per line on stdin, so that its
figures and the server's are taken in alternation; each answer is one JSON line on stdout. The
first line says whether the learner loaded:

    .venv/train/bin/python -m bench.fastai_baseline --learner models/export.pkl
    {"image": "build/bench-inputs/jpeg400.jpg", "count": 10, "seconds": 20}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fastai_baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learner", type=Path, default=Path("models/export.pkl"))
    args = p.parse_args(argv)

    if not args.learner.is_file():
        print(json.dumps({"skipped": f"learner {args.learner} not found"}), flush=True)
        return 0
    started = time.perf_counter()
    import torch

    from learners.learner import LearnerError, load
    try:
        learn = load(args.learner)
    except LearnerError as exc:
        print(json.dumps({"skipped": str(exc)}), flush=True)
        return 0
    print(json.dumps({"ready": True, "learner": str(args.learner), "load_seconds": time.perf_counter() - started,
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads()}), flush=True)
    warmed = set()
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        path = Path(command["image"])
        times, label = [], None
        with warnings.catch_warnings(), learn.no_bar():
            warnings.simplefilter("ignore")
            if path not in warmed:
                for _ in range(2):
                    learn.predict(path)
                warmed.add(path)
            deadline = time.perf_counter() + command["seconds"]
            while len(times) < command["count"] and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                label = str(learn.predict(path)[0])
                times.append((time.perf_counter() - t0) * 1000)
        print(json.dumps({"latencies_ms": times, "top1": label}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
