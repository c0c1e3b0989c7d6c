"""`python -m bench` (`make bench`): how fast whatcar serves on this machine, against its floor
and against other ways of serving the same model, with each target's ratio from this one run.

    python -m bench [--model-dir artifacts] [--learner models/export.pkl] [--out build/bench.json]
                    [--quick] [--skip-fastai] [--skip-torchserve]

Measured, in this order:
  floor       decode + preprocess + forward in one process, no HTTP (bench/floor.py)
  fastai      learn.predict on the same learner and photo, in the training virtualenv
  whatcar     `python -m serve` under load from keep-alive clients on 127.0.0.1
  torchserve  TorchServe 0.12 with the same model.pt (bench/peer.py), if it can start

Every figure is compared only with figures from the same run, so a slower or busier machine
moves both sides of each ratio. Load stays on 127.0.0.1 and every run is bounded in requests
and seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from serve.cpus import available_cpus

from . import inputs as inputs_mod
from . import peer
from .load import Process, free_port, get_status, rss_mib, run_load, tree_rss_mib

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus_available": available_cpus(), "cpus_online": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "loadavg_before": list(os.getloadavg())}


def run_json(cmd: list[str], timeout: float) -> dict:
    """Run a measuring subprocess and read the JSON object it prints last."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1])


class Budget:
    """Request counts and seconds for each phase; --quick shrinks them for trying the code out."""

    def __init__(self, quick: bool):
        self.scale = 0.05 if quick else 1.0

    def n(self, count: int) -> int:
        return max(3, int(count * self.scale))

    def s(self, seconds: float) -> float:
        return max(1.0, seconds * self.scale)


def measure_floor(args, files: dict, budget: Budget) -> dict:
    cmd = [sys.executable, "-m", "bench.floor", "--model-dir", str(args.model_dir),
           "--count", str(budget.n(80)), "--seconds", str(budget.s(10))]
    for name, path in files.items():
        cmd += ["--image", f"{name}={path}"]
    return run_json(cmd, timeout=600)


def measure_fastai(args, files: dict, budget: Budget) -> dict:
    if args.skip_fastai:
        return {"skipped": "--skip-fastai"}
    if not args.learner.is_file():
        return {"skipped": f"learner {args.learner} not found (make train, or pass --learner)"}
    if not Path(args.train_python).is_file():
        return {"skipped": f"no training virtualenv at {args.train_python} (make train-env)"}
    cmd = [str(args.train_python), "-m", "bench.fastai_baseline", "--learner", str(args.learner),
           "--count", str(budget.n(30)), "--seconds", str(budget.s(60)), str(files["jpeg400"])]
    try:
        return run_json(cmd, timeout=900)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"skipped": f"learn.predict baseline failed: {exc}"}


def serve_command(args, port: int) -> list[str]:
    return [sys.executable, "-m", "serve", "--model-dir", str(args.model_dir), "--port", str(port)]


def import_torch_seconds(rounds: int) -> list[float]:
    """How long a bare `import torch` takes here: the part of any cold start no server code controls."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True, timeout=120)
        times.append(time.perf_counter() - started)
    return times


def server_settings() -> dict:
    """WHATCAR_* variables in effect for the measured server (the rest are its defaults)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("WHATCAR_")}


def cold_starts(args, rounds: int) -> tuple[list[float], Process, int]:
    """Start the server `rounds` times, timing process start to /readyz 200; keep the last one."""
    times, process, port = [], None, None
    for i in range(rounds):
        if process is not None:
            process.stop()
        port = free_port()
        process = Process(serve_command(args, port), env=os.environ.copy(), cwd=ROOT,
                          log=args.out.parent / "bench-serve.log")
        seconds = process.wait_until(lambda: get_status(port, "/readyz", timeout=0.5) == 200, timeout=120)
        if seconds is None:
            process.stop()
            raise RuntimeError(f"whatcar did not become ready; see {args.out.parent / 'bench-serve.log'}")
        times.append(seconds)
    return times, process, port


class Counter:
    """Requests sent to one server, warm-up ones included, for the memory checkpoint."""

    def __init__(self):
        self.total = 0

    def add(self, result, concurrency_warmup: int = 0) -> None:
        self.total += result.ok + sum(result.errors.values()) + concurrency_warmup * result.concurrency


def load(port: int, path: str, item, concurrency: int, requests: int, seconds: float, counter: Counter,
         warmup: int = 1) -> dict:
    result = run_load(port, path, item.data, item.content_type, concurrency, requests, seconds, warmup=warmup)
    counter.add(result, warmup)
    summary = result.summary()
    log(f"  {item.name} c={concurrency}: {summary['requests']} ok, {sum(result.errors.values())} errors, "
        f"{summary['throughput_rps']:.1f} req/s, p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms")
    return summary


def measure_whatcar(args, items: dict, budget: Budget) -> dict:
    out: dict = {"runs": {}}
    starts, process, port = cold_starts(args, 3 if not args.quick else 1)
    out["cold_start_s"] = starts
    out["import_torch_s"] = import_torch_seconds(3 if not args.quick else 1)
    out["settings"] = server_settings()
    log(f"whatcar cold starts: {', '.join(f'{s:.2f}s' for s in starts)}")
    counter = Counter()
    try:
        # Warm-up: every input kind once per client, then a burst at the highest concurrency.
        for name in ("jpeg400", "jpeg12mp", "png"):
            load(port, "/predict", items[name], 2, budget.n(10), budget.s(20), counter)
        load(port, "/predict", items["jpeg400"], 8, budget.n(80), budget.s(10), counter)
        out["rss_warm_mib"] = rss_mib(process.pid)
        out["requests_at_warm"] = counter.total
        plan = [("jpeg400", 1, 400, 20), ("jpeg12mp", 1, 60, 20), ("png", 1, 150, 10),
                ("jpeg400", 4, 800, 15), ("jpeg400", 8, 1200, 20)]
        for name, concurrency, requests, seconds in plan:
            key = f"{name}_c{concurrency}"
            out["runs"][key] = load(port, "/predict", items[name], concurrency, budget.n(requests),
                                    budget.s(seconds), counter)
        # Big uploads at full concurrency (the likeliest to grow memory), then web photos until
        # at least 2,000 requests have been served.
        target = 2000 if not args.quick else 100
        load(port, "/predict", items["jpeg12mp"], 8, budget.n(100), 60, counter, 0)
        while counter.total < target:
            result = load(port, "/predict", items["jpeg400"], 8, target - counter.total, 60, counter, 0)
            if result["requests"] == 0:
                break
        out["requests_total"] = counter.total
        out["rss_after_mib"] = rss_mib(process.pid)
        log(f"whatcar RSS {out['rss_warm_mib']:.0f} MiB after warm-up, {out['rss_after_mib']:.0f} MiB after "
            f"{counter.total} requests")
    finally:
        process.stop()
    return out


def measure_torchserve(args, items: dict, budget: Budget) -> dict:
    if args.skip_torchserve:
        return {"skipped": "--skip-torchserve"}
    item = items["jpeg400"]

    def ready(port: int) -> bool:
        result = run_load(port, "/predictions/whatcar", item.data, item.content_type, 1, 1, 5, timeout=5)
        return result.ok == 1

    workdir = args.out.parent / "torchserve"
    started = peer.start(Path(args.torchserve_venv), args.model_dir.resolve(), workdir.resolve(), ready,
                         workers=args.ts_workers, torch_threads=args.ts_threads, batch_size=args.ts_batch,
                         max_batch_delay_ms=args.ts_batch_delay)
    if isinstance(started, str):
        log(f"torchserve skipped: {started}")
        return {"skipped": started}
    out = {"settings": started.settings, "ready_s": started.started_seconds, "runs": {}}
    counter = Counter()
    try:
        load(started.port, "/predictions/whatcar", item, 8, budget.n(80), budget.s(10), counter)
        out["runs"]["jpeg400_c1"] = load(started.port, "/predictions/whatcar", item, 1, budget.n(400),
                                         budget.s(20), counter)
        out["runs"]["jpeg400_c8"] = load(started.port, "/predictions/whatcar", item, 8, budget.n(1200),
                                         budget.s(20), counter)
        out["rss_mib"] = tree_rss_mib(started.process.pid)
    finally:
        started.process.stop()
    return out


# ---------------------------------------------------------------- report


def target(name: str, ratio: float | None, limit: float, higher_is_better: bool, detail: str) -> dict:
    if ratio is None:
        return {"target": name, "ratio": None, "limit": limit, "met": None, "detail": detail}
    met = ratio >= limit if higher_is_better else ratio <= limit
    return {"target": name, "ratio": ratio, "limit": limit, "met": met, "detail": detail,
            "direction": ">=" if higher_is_better else "<="}


def evaluate(results: dict) -> list[dict]:
    floor, http = results["floor"], results["whatcar"]
    runs = http["runs"]
    single = floor["single"]["jpeg400"]
    best_single = min(v["p50_ms"] for v in single.values())
    best_tp = max(v["images_per_s"] for v in floor["throughput"])
    c1, c8 = runs["jpeg400_c1"], runs["jpeg400_c8"]
    out = [
        target("HTTP p50 at c=1 / floor single stream (400 px JPEG)", c1["p50_ms"] / best_single, 1.15, False,
               f"{c1['p50_ms']:.1f} ms vs {best_single:.1f} ms"),
        target("HTTP throughput at c=8 / best floor throughput (both cores)", c8["throughput_rps"] / best_tp, 0.9,
               True, f"{c8['throughput_rps']:.1f} vs {best_tp:.1f} images/s"),
    ]
    fastai = results["fastai"]
    if "skipped" in fastai:
        out.append(target("learn.predict time per image / HTTP p50 at c=1", None, 5, True, fastai["skipped"]))
    else:
        predict = next(iter(fastai["images"].values()))["p50_ms"]
        out.append(target("learn.predict time per image / HTTP p50 at c=1", predict / c1["p50_ms"], 5, True,
                          f"{predict:.1f} ms vs {c1['p50_ms']:.1f} ms"))
    ts = results["torchserve"]
    if "skipped" in ts:
        out.append(target("HTTP throughput at c=8 / TorchServe's", None, 1.5, True, ts["skipped"]))
        out.append(target("TorchServe p99 at c=8 / HTTP p99 at c=8", None, 1.0, True, ts["skipped"]))
    else:
        tc8 = ts["runs"]["jpeg400_c8"]
        out.append(target("HTTP throughput at c=8 / TorchServe's", c8["throughput_rps"] / tc8["throughput_rps"],
                          1.5, True, f"{c8['throughput_rps']:.1f} vs {tc8['throughput_rps']:.1f} req/s"))
        out.append(target("TorchServe p99 at c=8 / HTTP p99 at c=8", tc8["p99_ms"] / c8["p99_ms"], 1.0, True,
                          f"{tc8['p99_ms']:.1f} ms vs {c8['p99_ms']:.1f} ms"))
    big = runs["jpeg12mp_c1"]
    out.append(target("12 MP JPEG p50 / 400 px JPEG p50 (HTTP, c=1)", big["p50_ms"] / c1["p50_ms"], 3.0, False,
                      f"{big['p50_ms']:.1f} ms vs {c1['p50_ms']:.1f} ms"))
    starts = sorted(http["cold_start_s"])
    median_start = starts[len(starts) // 2]
    out.append(target("cold start, process start to /readyz 200 (s, median)", median_start, 2.0, False,
                      "runs: " + ", ".join(f"{s:.2f}" for s in http["cold_start_s"])
                      + "; a bare `import torch` took " + ", ".join(f"{s:.2f}" for s in http["import_torch_s"])))
    after = http["rss_after_mib"] * (1 << 20) / MB
    warm = http["rss_warm_mib"] * (1 << 20) / MB
    out.append(target(f"RSS after {http['requests_total']} requests (MB)", after, 300, False,
                      f"{after:.0f} MB"))
    out.append(target("RSS after those requests / after warm-up", after / warm, 1.10, False,
                      f"{after:.0f} MB vs {warm:.0f} MB"))
    return out


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cpus_available']} CPUs available, {m['date']}, "
                 f"load average before {m['loadavg_before'][0]:.2f}, after {m['loadavg_after'][0]:.2f}")
    lines.append("inputs: " + "; ".join(results["inputs"].values()))
    lines.append("whatcar settings: " + (", ".join(f"{k}={v}" for k, v in results["whatcar"]["settings"].items())
                                         or "the defaults"))
    lines.append("")
    lines.append("| measurement | p50 ms | p95 ms | p99 ms | images/s |")
    lines.append("|---|---:|---:|---:|---:|")
    floor = results["floor"]
    for name, by_threads in floor["single"].items():
        for threads, r in by_threads.items():
            lines.append(f"| floor {name}, single stream, {threads.replace('threads', '')} thread(s) "
                         f"(preprocess {r['preprocess_p50_ms']:.1f} + forward {r['forward_p50_ms']:.1f}) "
                         f"| {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | - | {1000 / r['mean_ms']:.1f} |")
    for r in floor["throughput"]:
        lines.append(f"| floor jpeg400, {r['streams']} stream(s) x {r['torch_threads']} thread(s), batch {r['batch']} "
                     f"| - | - | - | {r['images_per_s']:.1f} |")
    fastai = results["fastai"]
    if "skipped" in fastai:
        lines.append(f"| fastai learn.predict: skipped ({fastai['skipped']}) | - | - | - | - |")
    else:
        for name, r in fastai["images"].items():
            lines.append(f"| fastai learn.predict {name} ({fastai['torch_threads']} threads) | {fmt(r['p50_ms'])} "
                         f"| - | - | {1000 / r['mean_ms']:.1f} |")
    for key, r in results["whatcar"]["runs"].items():
        name, conc = key.rsplit("_c", 1)
        lines.append(f"| whatcar HTTP {name}, c={conc} ({r['requests']} requests) | {fmt(r['p50_ms'])} "
                     f"| {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {r['throughput_rps']:.1f} |")
    ts = results["torchserve"]
    if "skipped" in ts:
        lines.append(f"| TorchServe: skipped ({ts['skipped']}) | - | - | - | - |")
    else:
        s = ts["settings"]
        for key, r in ts["runs"].items():
            name, conc = key.rsplit("_c", 1)
            lines.append(f"| TorchServe {name}, c={conc} ({s['workers']} workers x {s['torch_threads']} thread(s), "
                         f"batch {s['batch_size']}) | {fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} "
                         f"| {r['throughput_rps']:.1f} |")
    lines.append("")
    lines.append("| target | limit | measured | met | detail |")
    lines.append("|---|---:|---:|:---:|---|")
    for t in results["targets"]:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        limit = f"{t.get('direction', '')} {t['limit']:g}".strip()
        lines.append(f"| {t['target']} | {limit} | {fmt(t['ratio'], 2)} | {met} | {t['detail']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--learner", type=Path, default=Path("models/export.pkl"),
                   help="fastai learner for the learn.predict baseline (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("build/bench.json"), help="results file (default: %(default)s)")
    p.add_argument("--photo", type=Path, default=inputs_mod.DEFAULT_PHOTO, help="the web photo the inputs come from")
    p.add_argument("--train-python", default=str(ROOT / ".venv" / "train" / "bin" / "python"))
    p.add_argument("--torchserve-venv", default=str(ROOT / ".venv" / "torchserve"))
    p.add_argument("--ts-workers", type=int, default=available_cpus())
    p.add_argument("--ts-threads", type=int, default=1)
    p.add_argument("--ts-batch", type=int, default=1)
    p.add_argument("--ts-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay in ms")
    p.add_argument("--quick", action="store_true", help="tiny counts, to check the benchmark itself runs")
    p.add_argument("--skip-fastai", action="store_true")
    p.add_argument("--skip-torchserve", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.quick)
    results: dict = {"machine": machine()}
    if results["machine"]["loadavg_before"][0] > 0.5:
        log(f"warning: load average is {results['machine']['loadavg_before'][0]:.2f} before starting; "
            "other work on this machine will move the figures (the ratios less so)")
    items = inputs_mod.build(args.photo)
    results["inputs"] = {name: item.describe() for name, item in items.items()}
    folder = args.out.parent / "bench-inputs"
    folder.mkdir(exist_ok=True)
    files = {}
    for name, item in items.items():
        files[name] = folder / f"{name}.{'png' if item.content_type == 'image/png' else 'jpg'}"
        files[name].write_bytes(item.data)

    log("floor: in-process decode + preprocess + forward")
    results["floor"] = measure_floor(args, files, budget)
    log("fastai: learn.predict")
    results["fastai"] = measure_fastai(args, files, budget)
    log("whatcar: python -m serve over HTTP")
    results["whatcar"] = measure_whatcar(args, items, budget)
    log("torchserve: the same model.pt")
    results["torchserve"] = measure_torchserve(args, items, budget)
    results["machine"]["loadavg_after"] = list(os.getloadavg())
    results["targets"] = evaluate(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    report = table(results)
    args.out.with_suffix(".md").write_text(report + "\n")
    print(report)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
