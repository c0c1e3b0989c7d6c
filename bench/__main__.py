"""`python -m bench` (`make bench`): how fast whatcar serves on this machine, against its floor
and against other ways of serving the same model, with each target's ratio from this one run.

    python -m bench [--model-dir artifacts] [--learner models/export.pkl] [--out build/bench.json]
                    [--rounds 3] [--quick] [--skip-fastai] [--skip-torchserve]

What is measured:
  floor       decode + preprocess + forward in one process, no HTTP (bench/floor.py)
  fastai      learn.predict on the same learner and photo, in the training virtualenv
  whatcar     `python -m serve` under load from keep-alive clients on 127.0.0.1
  torchserve  TorchServe 0.12 with the same model.pt (bench/peer.py), if it can start
  classify    `python -m serve.classify` over a folder of copies of the web photo

All four stay up for the whole run and are measured in alternation, round after round: a
floor figure and the server figure it is compared with are taken a few seconds apart, so
whatever else the machine is doing weighs on both. Each target's ratio is computed per round;
the report gives the median over the rounds and their range, and says how much CPU other
processes used meanwhile. Load stays on 127.0.0.1 and every step is bounded in requests and
seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from ops.launch import Server, launch
from serve.cpus import available_cpus
from serve.versions import current_folder

from . import inputs as inputs_mod
from . import peer
from .load import get_body, percentile, rss_mib, run_load, tree_cpu_seconds, tree_rss_mib
from .report import Series, bracketed, evaluate, single_thread_counts, table
from .workers import Worker, start_worker

ROOT = Path(__file__).resolve().parent.parent
def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the machine


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
            "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "loadavg_before": list(os.getloadavg())}


def cpu_seconds_busy() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, from /proc/stat (Linux)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and every child it has waited for."""
    import resource
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


# ---------------------------------------------------------------- helpers


class Budget:
    """Request counts and seconds for each step; --quick shrinks them for trying the code out."""

    def __init__(self, quick: bool):
        self.scale = 0.1 if quick else 1.0

    def n(self, count: int) -> int:
        return max(3, int(count * self.scale))

    def s(self, seconds: float) -> float:
        return max(1.0, seconds * self.scale)


class Counter:
    """Requests sent to one server, warm-up ones included, for the memory checkpoint."""

    def __init__(self):
        self.total = 0

    def add(self, result, warmup: int = 0) -> None:
        self.total += result.ok + sum(result.errors.values()) + warmup * result.concurrency


def http(port: int, path: str, item, concurrency: int, requests: int, seconds: float, counter: Counter,
         series: Series | None = None, warmup: int = 1, label: str = "") -> dict:
    result = run_load(port, path, item.data, item.content_type, concurrency, requests, seconds, warmup=warmup)
    counter.add(result, warmup)
    summary = result.summary()
    if result.errors:
        log(f"  {label} {item.name} c={concurrency}: errors {result.errors}")
    if series is not None:
        series.add(result.latencies_ms, summary["throughput_rps"], errors=sum(result.errors.values()))
    return summary


# ---------------------------------------------------------------- whatcar start-up


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


def cold_starts(args, rounds: int) -> tuple[list[float], list[float], Server]:
    """Start the server `rounds` times, timing process start to ready (its ready file, written when
    /readyz turns 200), each after timing a bare `import torch` (so each start has its own reference,
    taken a moment before); keep the last one."""
    times, imports, server = [], [], None
    log_path = args.out.parent / "bench-serve.log"
    log_path.unlink(missing_ok=True)
    for _ in range(rounds):
        if server is not None:
            server.stop()
        imports += import_torch_seconds(1)
        server = launch(["--model-dir", str(args.model_dir), "--port", "0"], log=log_path, env=os.environ.copy(),
                        cwd=ROOT)
        times.append(server.ready_seconds)
    return times, imports, server


def classify_throughput(args, photo: Path, count: int) -> float:
    """Images per second of `python -m serve.classify` over `count` copies of a photo (its own
    summary line, which leaves out the model's load)."""
    folder = args.out.parent / "bench-classify"
    folder.mkdir(exist_ok=True)
    for i in range(count):
        target = folder / f"{i:04d}{photo.suffix}"
        if not target.exists():
            target.write_bytes(photo.read_bytes())
    results = args.out.parent / "bench-classify.csv"
    results.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "serve.classify", str(folder), str(results), "--model-dir",
                           str(args.model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    found = re.search(r"\(([0-9.]+) images/s\)", summary)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"make classify failed: {summary or done.returncode}")
    return float(found.group(1))


# ---------------------------------------------------------------- forward passes against OpenVINO


def start_openvino(args, input_size: list[int], out: dict) -> Worker | None:
    """The OpenVINO reference on an ONNX copy of the served module, or None with the reason in
    out["openvino"]["skipped"]."""
    if args.skip_openvino:
        out["openvino"] = {"skipped": "--skip-openvino"}
        return None
    if not Path(args.openvino_python).is_file():
        out["openvino"] = {"skipped": f"no OpenVINO virtualenv at {args.openvino_python} (make openvino-env)"}
        return None
    if not Path(args.train_python).is_file():
        out["openvino"] = {"skipped": f"no training virtualenv at {args.train_python} to export ONNX with"}
        return None
    log("openvino: exporting the served module to ONNX, then loading it")
    onnx = (args.out.parent / "bench-model.onnx").resolve()
    done = subprocess.run([str(args.train_python), "-m", "bench.onnx_export", str(args.model_dir), str(onnx)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        out["openvino"] = {"skipped": f"the ONNX export failed: {tail}"}
        return None
    worker = start_worker("openvino", [str(args.openvino_python), "-m", "bench.openvino_worker", str(onnx),
                                       *map(str, input_size)], args.out.parent / "bench-openvino.log", 300)
    if isinstance(worker, str):
        out["openvino"] = {"skipped": worker}
        log(f"  skipped: {worker}")
        return None
    out["openvino"] = {"version": worker.hello["openvino"], "precision": worker.hello["precision"]}
    return worker


def forward_passes(floor: Worker, openvino: Worker | None, budget: Budget, s) -> None:
    """One image's forward pass alone in each runtime, one after another on the same thread
    counts: the compiled package and TorchScript (the floor process), OpenVINO fp32 (its own)."""
    for threads in single_thread_counts(floor.hello["cpus"]):
        command = {"op": "forward", "input": "jpeg400", "threads": threads, "batch": 1, "count": budget.n(25),
                   "seconds": budget.s(5)}
        for runtime in floor.hello["forward_runtimes"]:
            a = floor.ask({**command, "runtime": runtime})
            s(f"forward_{runtime}_t{threads}").add(a["forward_ms"], cpu_ms=percentile(a["cpu_ms"], 50))
        if openvino is not None:
            a = openvino.ask(command)
            s(f"forward_openvino_t{threads}").add(a["forward_ms"], cpu_ms=percentile(a["cpu_ms"], 50))


# ---------------------------------------------------------------- the run


def floor_streams(floor: Worker, layouts: list[tuple], budget: Budget, s, when: str) -> None:
    """Every layout of the floor once. Taken before and after each round's loads on the
    servers: this machine's speed drifts by 10-20% within a minute, and the mean of the two is
    what the server figures measured between them are compared with."""
    for layout in layouts:
        a = floor.ask({"op": "streams", "input": "jpeg400", "streams": layout[0], "threads": layout[1],
                       "batch": layout[2], "seconds": budget.s(4)})
        s("floor_streams_{}x{}_b{}_".format(*layout) + when).add([], a["images_per_s"])


def run(args, items: dict, files: dict, budget: Budget) -> dict:
    out: dict = {"floor": {}, "fastai": {}, "whatcar": {}, "torchserve": {}, "openvino": {}}
    workers: list = []
    peer_server = None
    whatcar = None
    try:
        log("whatcar: cold starts")
        starts, imports, whatcar = cold_starts(args, 3 if not args.quick else 1)
        port = whatcar.port
        out["whatcar"].update(cold_start_s=starts, import_torch_s=imports, settings=server_settings(),
                              runtime=json.loads(get_body(port, "/metadata"))["runtime"])
        log(f"  ready after {', '.join(f'{s:.2f}' for s in starts)} s, serving on {out['whatcar']['runtime']['name']}")
        counter = Counter()
        for name in ("jpeg400", "jpeg12mp", "png"):
            http(port, "/predict", items[name], 2, budget.n(10), budget.s(20), counter)
        http(port, "/predict", items["jpeg400"], 8, budget.n(80), budget.s(10), counter)
        out["whatcar"]["rss_warm_mib"] = rss_mib(whatcar.pid)
        out["whatcar"]["requests_at_warm"] = counter.total

        log("floor: loading the artifact in a measuring process")
        floor_cmd = [sys.executable, "-m", "bench.floor", "--model-dir", str(args.model_dir)]
        for name, path in files.items():
            floor_cmd += ["--image", f"{name}={path}"]
        floor = start_worker("floor", floor_cmd, args.out.parent / "bench-floor.log", 300)
        if isinstance(floor, str):
            raise RuntimeError(f"the floor could not run: {floor}")
        workers.append(floor)

        out["floor"].update(runtime=floor.hello["runtime"], forward_missing=floor.hello["forward_missing"])
        openvino = start_openvino(args, floor.hello["input_size"], out)
        if openvino is not None:
            workers.append(openvino)

        fastai = None
        if args.skip_fastai:
            out["fastai"] = {"skipped": "--skip-fastai"}
        elif not Path(args.train_python).is_file():
            out["fastai"] = {"skipped": f"no training virtualenv at {args.train_python} (make train-env)"}
        else:
            log("fastai: loading the learner in the training virtualenv")
            fastai = start_worker("fastai", [str(args.train_python), "-m", "bench.fastai_baseline", "--learner",
                                             str(args.learner)], args.out.parent / "bench-fastai.log", 600)
            if isinstance(fastai, str):
                out["fastai"] = {"skipped": fastai}
                fastai = None
            else:
                workers.append(fastai)
                out["fastai"]["torch_threads"] = fastai.hello["torch_threads"]
                out["fastai"]["torch"] = fastai.hello["torch"]

        ts_port = None
        if args.skip_torchserve:
            out["torchserve"] = {"skipped": "--skip-torchserve"}
        else:
            log("torchserve: starting it with the same model.pt")
            jpeg = items["jpeg400"]

            def ts_ready(p: int) -> bool:
                return run_load(p, "/predictions/whatcar", jpeg.data, jpeg.content_type, 1, 1, 5, timeout=5).ok == 1

            started = peer.start(Path(args.torchserve_venv), current_folder(args.model_dir).resolve(),
                                 (args.out.parent / "torchserve").resolve(), ts_ready, workers=args.ts_workers,
                                 torch_threads=args.ts_threads, batch_size=args.ts_batch,
                                 max_batch_delay_ms=args.ts_batch_delay)
            if isinstance(started, str):
                log(f"  skipped: {started}")
                out["torchserve"] = {"skipped": started}
            else:
                peer_server, ts_port = started, started.port
                out["torchserve"].update(settings=started.settings, ready_s=started.started_seconds)
                http(ts_port, "/predictions/whatcar", jpeg, 8, budget.n(80), budget.s(10), Counter())

        series: dict[str, Series] = {}

        def s(key: str) -> Series:
            return series.setdefault(key, Series())

        layouts = [tuple(layout) for layout in floor.hello["layouts"]]
        for r in range(args.rounds):
            log(f"round {r + 1} of {args.rounds}")
            jpeg = items["jpeg400"]
            for threads in single_thread_counts(floor.hello["cpus"]):
                a = floor.ask({"op": "single", "input": "jpeg400", "threads": threads, "count": budget.n(25),
                               "seconds": budget.s(6)})
                s(f"floor_single_t{threads}").add(a["latencies_ms"], forward_ms=percentile(a["forward_ms"], 50),
                                                  preprocess_ms=percentile(a["preprocess_ms"], 50))
            http(port, "/predict", jpeg, 1, budget.n(80), budget.s(6), counter, s("whatcar_jpeg400_c1"))
            forward_passes(floor, openvino, budget, s)
            if fastai is not None:
                a = fastai.ask({"image": str(files["jpeg400"]), "count": budget.n(10), "seconds": budget.s(10)})
                s("fastai_jpeg400").add(a["latencies_ms"])
                out["fastai"]["top1"] = a["top1"]
            http(port, "/predict", items["jpeg12mp"], 1, budget.n(20), budget.s(5), counter, s("whatcar_jpeg12mp_c1"))
            http(port, "/predict", items["png"], 1, budget.n(40), budget.s(4), counter, s("whatcar_png_c1"))
            if r == 0:
                for threads in single_thread_counts(floor.hello["cpus"]):
                    a = floor.ask({"op": "single", "input": "jpeg12mp", "threads": threads, "count": budget.n(10),
                                   "seconds": budget.s(4)})
                    s(f"floor_single_jpeg12mp_t{threads}").add(a["latencies_ms"])
            floor_streams(floor, layouts, budget, s, "before")
            s("classify_jpeg400").add([], classify_throughput(args, files["jpeg400"], budget.n(200)))
            http(port, "/predict", jpeg, 4, budget.n(400), budget.s(6), counter, s("whatcar_jpeg400_c4"))
            http(port, "/predict", jpeg, 8, budget.n(600), budget.s(8), counter, s("whatcar_jpeg400_c8"))
            if ts_port is not None:
                http(ts_port, "/predictions/whatcar", jpeg, 8, budget.n(600), budget.s(8), Counter(),
                     s("torchserve_jpeg400_c8"))
                http(ts_port, "/predictions/whatcar", jpeg, 1, budget.n(80), budget.s(4), Counter(),
                     s("torchserve_jpeg400_c1"))
            floor_streams(floor, layouts, budget, s, "after")
            c1, c8 = s("whatcar_jpeg400_c1").rounds[-1], s("whatcar_jpeg400_c8").rounds[-1]
            log(f"  whatcar c=1 p50 {c1['p50_ms']:.1f} ms, c=8 {c8['throughput']:.1f} req/s")

        log("whatcar: phone photos at full concurrency, then up to 2,000 requests, for memory")
        http(port, "/predict", items["jpeg12mp"], 8, budget.n(100), 60, counter, warmup=0)
        target = 2000 if not args.quick else 100
        while counter.total < target:
            before = counter.total
            http(port, "/predict", items["jpeg400"], 8, target - counter.total, 60, counter, warmup=0)
            if counter.total == before:
                break
        out["whatcar"]["requests_total"] = counter.total
        out["whatcar"]["rss_after_mib"] = rss_mib(whatcar.pid)
        if peer_server is not None:
            out["torchserve"]["rss_mib"] = tree_rss_mib(peer_server.process.pid)
            # Its Java front end is not our child once stopped, so its CPU time is taken here.
            out["torchserve"]["cpu_seconds"] = tree_cpu_seconds(peer_server.process.pid)
        for layout in layouts:
            key = "floor_streams_{}x{}_b{}".format(*layout)
            series[key] = bracketed(series.pop(key + "_before"), series.pop(key + "_after"))
        out["series"] = {key: value.summary() for key, value in series.items()}
        return out
    finally:
        for worker in workers:
            worker.close()
        if peer_server is not None:
            peer_server.process.stop()
        if whatcar is not None:
            whatcar.stop()


# ---------------------------------------------------------------- targets and report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--learner", type=Path, default=Path("models/export.pkl"),
                   help="fastai learner for the learn.predict baseline (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("build/bench.json"), help="results file (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="measurement rounds (default: %(default)s)")
    p.add_argument("--photo", type=Path, default=inputs_mod.DEFAULT_PHOTO, help="the web photo the inputs come from")
    p.add_argument("--train-python", default=str(ROOT / ".venv" / "train" / "bin" / "python"))
    p.add_argument("--torchserve-venv", default=str(ROOT / ".venv" / "torchserve"))
    p.add_argument("--openvino-python", default=str(ROOT / ".venv" / "openvino" / "bin" / "python"))
    p.add_argument("--ts-workers", type=int, default=available_cpus())
    p.add_argument("--ts-threads", type=int, default=1)
    p.add_argument("--ts-batch", type=int, default=1)
    p.add_argument("--ts-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay in ms")
    p.add_argument("--quick", action="store_true", help="tiny counts and one round, to check the benchmark runs")
    p.add_argument("--skip-fastai", action="store_true")
    p.add_argument("--skip-torchserve", action="store_true")
    p.add_argument("--skip-openvino", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.quick)
    results: dict = {"machine": machine(), "rounds": args.rounds}
    if results["machine"]["loadavg_before"][0] > 0.5:
        log(f"warning: load average is {results['machine']['loadavg_before'][0]:.2f} before starting; "
            "other work on this machine moves the figures (the ratios less so)")
    started, busy_before, own_before = time.perf_counter(), cpu_seconds_busy(), own_cpu_seconds()
    items = inputs_mod.build(args.photo)
    results["inputs"] = {name: item.describe() for name, item in items.items()}
    folder = args.out.parent / "bench-inputs"
    folder.mkdir(exist_ok=True)
    files = {}
    for name, item in items.items():
        files[name] = (folder / f"{name}.{'png' if item.content_type == 'image/png' else 'jpg'}").resolve()
        files[name].write_bytes(item.data)

    results.update(run(args, items, files, budget))
    results["machine"]["loadavg_after"] = list(os.getloadavg())
    busy_after = cpu_seconds_busy()
    if busy_before is not None and busy_after is not None:
        # Whatever the machine did besides this benchmark and its children moves every figure.
        elapsed = time.perf_counter() - started
        ours = own_cpu_seconds() - own_before + results["torchserve"].get("cpu_seconds", 0.0)
        others = max(0.0, (busy_after - busy_before) - ours)
        results["machine"]["other_cpu_share"] = others / (elapsed * results["machine"]["cpus_available"])
        results["machine"]["seconds"] = elapsed
    results["targets"] = evaluate(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    report = table(results)
    args.out.with_suffix(".md").write_text(report + "\n")
    print(report)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
