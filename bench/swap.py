"""What a model swap costs a running server: latency while it happens, and memory after.

    python -m bench.swap [--model-dir artifacts] [--swaps 20] [--concurrency 8] [--runtime auto]

Copies the model folder's current version twice into a temporary model folder (versions 1 and
2), starts `python -m serve` on it with the repository API on loopback, and then, under
`--concurrency` closed-loop clients posting the 400 px test photo:

  steady     p50/p99 latency for a while with no swap;
  swapping   p50/p99 of the requests that overlapped a load call, over `--swaps` loads
             alternating the two versions (each load checks and warms the new version while the
             old one serves);
  memory     resident memory before the first swap, the highest seen while swapping, after each
             swap once it settled, and at the end under the same load and once the clients have
             stopped; then the same two figures for a freshly started server on the same version,
             so that each is compared with its like.

Failed or refused requests are counted; there should be none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from ops.launch import Server, launch, post, without_settings
from serve.manifest import Manifest
from serve.versions import current_folder

from .inputs import DEFAULT_PHOTO
from .load import percentile, rss_mib

ROOT = Path(__file__).resolve().parent.parent


class Clients:
    """Closed-loop clients recording (start, end, ok) of every request until stopped."""

    def __init__(self, port: int, photo: bytes, concurrency: int):
        self.records: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(port, photo), daemon=True)
                        for _ in range(concurrency)]
        for thread in self.threads:
            thread.start()

    def run(self, port: int, photo: bytes) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                ok = post(port, "/predict", photo, "image/jpeg", timeout=120)[0] == 200
            except OSError:
                ok = False
            with self.lock:
                self.records.append((started, time.perf_counter(), ok))

    def between(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        with self.lock:
            return [r for r in self.records if start <= r[0] <= end]

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(130)


def latencies(records) -> list[float]:
    return [(end - start) * 1000 for start, end, ok in records if ok]


def start_server(model_dir: Path, log: Path, runtime: str) -> Server:
    return launch(["--model-dir", str(model_dir), "--port", "0", "--model-control", "explicit", "--runtime", runtime],
                  log=log, env=without_settings(), cwd=ROOT,
                  timeout=180)


def settled(pid: int, clients: Clients, seconds: float = 3.0) -> dict:
    """Resident memory while `clients` still post, then `seconds` after they stopped."""
    loaded = rss_mib(pid)
    clients.close()
    time.sleep(seconds)
    return {"loaded": loaded, "idle": rss_mib(pid)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.swap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--steady-seconds", type=float, default=20.0)
    p.add_argument("--runtime", choices=["auto", "compiled", "torchscript"], default="auto")
    p.add_argument("--out", type=Path, default=Path("build/swap.json"))
    args = p.parse_args(argv)
    photo = DEFAULT_PHOTO.read_bytes()
    source = current_folder(args.model_dir)
    name = Manifest.read(source).name
    work = Path(tempfile.mkdtemp(prefix="whatcar-swap-"))
    results: dict = {"source": str(source), "runtime": args.runtime, "concurrency": args.concurrency,
                     "swaps": args.swaps}
    try:
        models = work / "models"
        models.mkdir()
        for version in ("1", "2"):
            shutil.copytree(source, models / version)
        os.symlink("1", models / "current")
        server = start_server(models, work / "serve.log", args.runtime)
        port = server.port
        clients = Clients(port, photo, args.concurrency)
        try:
            time.sleep(3)  # every client connected and every thread warm
            rss_before = rss_mib(server.pid)
            steady_start = time.perf_counter()
            time.sleep(args.steady_seconds)
            steady = clients.between(steady_start, time.perf_counter())
            peak, after, during, seconds = rss_before, [], [], []
            for i in range(args.swaps):
                version = "2" if i % 2 == 0 else "1"
                watching = threading.Event()

                def watch():
                    nonlocal peak
                    while not watching.is_set():  # noqa: B023 - the thread ends within this iteration
                        peak = max(peak, rss_mib(server.pid) or 0)
                        time.sleep(0.05)

                watcher = threading.Thread(target=watch)
                watcher.start()
                asked = time.perf_counter()
                status, body = post(port, f"/v2/repository/models/{name}/load",
                                    json.dumps({"parameters": {"version": version}}).encode(), "application/json",
                                    timeout=300)
                loaded = time.perf_counter()
                watching.set()
                watcher.join()
                if status != 200:
                    raise RuntimeError(f"load of version {version} failed: {body[:300]!r}")
                seconds.append(loaded - asked)
                during += clients.between(asked, loaded)
                time.sleep(2)  # the old model's last requests end and its memory goes back
                after.append(rss_mib(server.pid))
            time.sleep(args.steady_seconds)
            swapped = settled(server.pid, clients)
        finally:
            clients.close()
            server.stop()
        all_records = clients.records
        fresh = start_server(models, work / "fresh.log", args.runtime)
        try:
            warm = Clients(fresh.port, photo, args.concurrency)
            time.sleep(3 + args.steady_seconds)
            rss_fresh = settled(fresh.pid, warm)
        finally:
            warm.close()
            fresh.stop()
        steady_ms, during_ms = latencies(steady), latencies(during)
        results.update(
            failed=sum(1 for _, _, ok in all_records if not ok), requests=len(all_records),
            steady={"n": len(steady_ms), "p50_ms": percentile(steady_ms, 50), "p99_ms": percentile(steady_ms, 99)},
            during_swaps={"n": len(during_ms), "p50_ms": percentile(during_ms, 50),
                          "p99_ms": percentile(during_ms, 99)},
            load_seconds={"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)},
            rss_mib={"before": rss_before, "peak_while_swapping": peak, "after_each_swap": after,
                     "after_swaps": swapped, "fresh_server_same_version": rss_fresh})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    rss = results["rss_mib"]
    print(f"{results['requests']} requests at c={args.concurrency}, {results['failed']} failed")
    print(f"steady:        p50 {results['steady']['p50_ms']:.1f} ms, p99 {results['steady']['p99_ms']:.1f} ms "
          f"({results['steady']['n']} requests)")
    print(f"during swaps:  p50 {results['during_swaps']['p50_ms']:.1f} ms, "
          f"p99 {results['during_swaps']['p99_ms']:.1f} ms "
          f"({results['during_swaps']['n']} requests overlapping {args.swaps} loads; p99 ratio "
          f"{results['during_swaps']['p99_ms'] / results['steady']['p99_ms']:.2f})")
    print(f"load call:     median {results['load_seconds']['median']:.2f} s "
          f"({results['load_seconds']['min']:.2f}-{results['load_seconds']['max']:.2f})")
    swapped, fresh = rss["after_swaps"], rss["fresh_server_same_version"]
    print(f"RSS (MiB):     before {rss['before']:.0f}, peak while swapping {rss['peak_while_swapping']:.0f}, after "
          f"swap 1 {rss['after_each_swap'][0]:.0f}, after swap {args.swaps} {rss['after_each_swap'][-1]:.0f}")
    for state in ("loaded", "idle"):
        print(f"  {state + ':':8} after {args.swaps} swaps {swapped[state]:.0f}, fresh server {fresh[state]:.0f} "
              f"(ratio {swapped[state] / fresh[state]:.2f})")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
