"""The benchmark's report, apart from any measuring: series of measurements, the floor's
layouts for the CPUs available, each target's per-round ratio and the tables printed at the end.
Pure functions of the figures, so tests/serve/test_bench_report.py can hold them to hand-made
numbers.
"""

from __future__ import annotations

import statistics

from .load import percentile

MB = 1_000_000
# The limits the targets are held to (docs/benchmark.md, "The targets, one by one"). Earlier runs
# were judged against 1.8x TorchServe, 5x learn.predict, 1 s beyond `import torch` and 300 MB;
# these are the current ones.
# HTTP throughput at c=8 against TorchServe serving the same model.pt.
TORCHSERVE_LIMIT = 2.0
# learn.predict's p50 per image against the server's p50 at c=1.
FASTAI_LIMIT = 3.0
# Seconds from process start to /readyz beyond a bare `import torch` timed just before.
COLD_BEYOND_TORCH_LIMIT = 0.5
# Resident memory after the run's requests, in MB.
RSS_LIMIT_MB = 350


def floor_layouts(cpus: int) -> list[tuple[int, int, int]]:
    """(streams, intra-op threads per stream, batch per pass) that keep `cpus` CPUs busy: one
    single-threaded stream per CPU (scoring one or two images a pass), one stream on every CPU
    (one or four images a pass), and, with four or more CPUs, streams of each thread count
    in between that divides the CPUs."""
    if cpus <= 1:
        return [(1, 1, 1), (1, 1, 2)]
    layouts = [(cpus, 1, 1), (cpus, 1, 2), (1, cpus, 1), (1, cpus, 4)]
    layouts += [(cpus // threads, threads, 1) for threads in range(2, cpus) if cpus % threads == 0]
    return layouts


def single_thread_counts(cpus: int) -> list[int]:
    """Intra-op thread counts of the floor's single stream: one, and every CPU."""
    return sorted({1, cpus})


class Series:
    """One measured thing, round after round: latencies pooled, throughput kept per round."""

    def __init__(self):
        self.latencies: list[float] = []
        self.rounds: list[dict] = []

    def add(self, latencies: list[float], throughput: float | None = None, **extra) -> dict:
        self.latencies.extend(latencies)
        entry = {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                 "count": len(latencies), "throughput": throughput, **extra}
        self.rounds.append(entry)
        return entry

    def summary(self) -> dict:
        throughputs = [r["throughput"] for r in self.rounds if r["throughput"] is not None]
        return {"count": len(self.latencies), "p50_ms": percentile(self.latencies, 50),
                "p95_ms": percentile(self.latencies, 95), "p99_ms": percentile(self.latencies, 99),
                "throughput": statistics.median(throughputs) if throughputs else None, "rounds": self.rounds}


def bracketed(before: Series, after: Series) -> Series:
    """One throughput per round: the mean of the figures taken before and after that round."""
    merged = Series()
    for b, a in zip(before.rounds, after.rounds):
        merged.add([], (b["throughput"] + a["throughput"]) / 2, before=b["throughput"], after=a["throughput"])
    return merged


def target(name: str, per_round: list[float] | None, limit: float, higher_is_better: bool, detail: str) -> dict:
    direction = ">=" if higher_is_better else "<="
    if not per_round:
        return {"target": name, "ratio": None, "limit": limit, "met": None, "detail": detail, "direction": direction}
    ratio = statistics.median(per_round)
    met = ratio >= limit if higher_is_better else ratio <= limit
    return {"target": name, "ratio": ratio, "range": [min(per_round), max(per_round)], "limit": limit,
            "met": met, "detail": detail, "direction": direction}


FORWARD_RUNTIMES = (("compiled", "compiled package"), ("torchscript", "TorchScript"), ("openvino", "OpenVINO fp32"))
FORWARD_LIMIT = 1.15


def forward_targets(results: dict) -> list[dict]:
    """The compiled package's forward pass against OpenVINO fp32's on the same number of threads,
    per round, for each thread count measured."""
    series = results["series"]
    out = []
    for threads in single_thread_counts(results["machine"]["cpus_available"]):
        name = f"compiled forward pass / OpenVINO fp32's, {plural(threads, 'thread')} (one image at the input size)"
        ours, theirs = series.get(f"forward_compiled_t{threads}"), series.get(f"forward_openvino_t{threads}")
        if ours is None or theirs is None:
            reason = (results.get("openvino", {}).get("skipped") if theirs is None else
                      results.get("floor", {}).get("forward_missing", {}).get("compiled")) or "not measured"
            out.append(target(name, None, FORWARD_LIMIT, False, reason))
            continue
        per_round = [a["p50_ms"] / b["p50_ms"] for a, b in zip(ours["rounds"], theirs["rounds"])]
        cpu = [a["cpu_ms"] / b["cpu_ms"] for a, b in zip(ours["rounds"], theirs["rounds"])
               if a.get("cpu_ms") and b.get("cpu_ms")]
        detail = f"{ours['p50_ms']:.1f} ms vs {theirs['p50_ms']:.1f} ms"
        if cpu:
            detail += f"; process CPU per pass {statistics.median(cpu):.2f}x"
        out.append(target(name, per_round, FORWARD_LIMIT, False, detail))
    return out


def evaluate(results: dict) -> list[dict]:
    series = results["series"]

    def rounds(key: str) -> list[dict]:
        return series[key]["rounds"] if key in series else []

    def per_round(fn, *keys) -> list[float]:
        columns = [rounds(k) for k in keys]
        if not all(columns):
            return []
        return [fn(*row) for row in zip(*columns)]

    singles = sorted(k for k in series if k.startswith("floor_single_t"))
    layouts = sorted(k for k in series if k.startswith("floor_streams_"))
    best_single = [min(row[k]["p50_ms"] for k in singles) for row in
                   [{k: rounds(k)[i] for k in singles} for i in range(len(rounds(singles[0])))]]
    best_tp = [max(row[k]["throughput"] for k in layouts) for row in
               [{k: rounds(k)[i] for k in layouts} for i in range(len(rounds(layouts[0])))]]
    c1, c8 = rounds("whatcar_jpeg400_c1"), rounds("whatcar_jpeg400_c8")
    out = [
        target("HTTP p50 at c=1 / floor single stream, best thread count (400 px JPEG)",
               [a["p50_ms"] / b for a, b in zip(c1, best_single)], 1.15, False,
               f"{series['whatcar_jpeg400_c1']['p50_ms']:.1f} ms vs {statistics.median(best_single):.1f} ms"),
        target("HTTP throughput at c=8 / best floor throughput on all cores",
               [a["throughput"] / b for a, b in zip(c8, best_tp)], 0.9, True,
               f"{series['whatcar_jpeg400_c8']['throughput']:.1f} vs {statistics.median(best_tp):.1f} images/s"),
    ]
    if "classify_jpeg400" in series:
        out.append(target("make classify throughput / best floor throughput on all cores",
                          [a["throughput"] / b for a, b in zip(rounds("classify_jpeg400"), best_tp)], 0.9, True,
                          f"{series['classify_jpeg400']['throughput']:.1f} vs "
                          f"{statistics.median(best_tp):.1f} images/s"))
    if "fastai_jpeg400" in series:
        out.append(target("learn.predict p50 per image / HTTP p50 at c=1",
                          per_round(lambda f, w: f["p50_ms"] / w["p50_ms"], "fastai_jpeg400", "whatcar_jpeg400_c1"),
                          FASTAI_LIMIT, True, f"{series['fastai_jpeg400']['p50_ms']:.1f} ms vs "
                                   f"{series['whatcar_jpeg400_c1']['p50_ms']:.1f} ms"))
    else:
        out.append(target("learn.predict p50 per image / HTTP p50 at c=1", None, FASTAI_LIMIT, True,
                          results["fastai"].get("skipped", "not measured")))
    if "torchserve_jpeg400_c8" in series:
        ts = series["torchserve_jpeg400_c8"]
        out.append(target("HTTP throughput at c=8 / TorchServe's",
                          per_round(lambda w, t: w["throughput"] / t["throughput"], "whatcar_jpeg400_c8",
                                    "torchserve_jpeg400_c8"), TORCHSERVE_LIMIT, True,
                          f"{series['whatcar_jpeg400_c8']['throughput']:.1f} vs {ts['throughput']:.1f} req/s"))
        out.append(target("TorchServe p99 at c=8 / HTTP p99 at c=8",
                          per_round(lambda w, t: t["p99_ms"] / w["p99_ms"], "whatcar_jpeg400_c8",
                                    "torchserve_jpeg400_c8"), 1.0, True,
                          f"{ts['p99_ms']:.1f} ms vs {series['whatcar_jpeg400_c8']['p99_ms']:.1f} ms"))
    else:
        reason = results["torchserve"].get("skipped", "not measured")
        out.append(target("HTTP throughput at c=8 / TorchServe's", None, TORCHSERVE_LIMIT, True, reason))
        out.append(target("TorchServe p99 at c=8 / HTTP p99 at c=8", None, 1.0, True, reason))
    out.append(target("12 MP JPEG p50 / 400 px JPEG p50 (HTTP, c=1)",
                      per_round(lambda b, w: b["p50_ms"] / w["p50_ms"], "whatcar_jpeg12mp_c1", "whatcar_jpeg400_c1"),
                      3.0, False, f"{series['whatcar_jpeg12mp_c1']['p50_ms']:.1f} ms vs "
                                  f"{series['whatcar_jpeg400_c1']['p50_ms']:.1f} ms"))
    http_ = results["whatcar"]
    out.append(target("cold start, process start to /readyz 200 (s)", http_["cold_start_s"], 2.0, False,
                      "runs: " + ", ".join(f"{v:.2f}" for v in http_["cold_start_s"])
                      + "; a bare `import torch` took " + ", ".join(f"{v:.2f}" for v in http_["import_torch_s"])))
    out.append(target("cold start beyond a bare `import torch` timed just before it (s)",
                      [a - b for a, b in zip(http_["cold_start_s"], http_["import_torch_s"])],
                      COLD_BEYOND_TORCH_LIMIT, False,
                      f"runtime {http_['runtime']['name']}" if http_.get("runtime") else "runtime not reported"))
    after = http_["rss_after_mib"] * (1 << 20) / MB
    warm = http_["rss_warm_mib"] * (1 << 20) / MB
    out.append(target(f"RSS after {http_['requests_total']} requests (MB)", [after], RSS_LIMIT_MB, False,
                      f"{after:.0f} MB"))
    out.append(target("RSS after those requests / after warm-up", [after / warm], 1.10, False,
                      f"{after:.0f} MB vs {warm:.0f} MB"))
    return out + forward_targets(results)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def floor_rows(cpus: int) -> list[tuple[str, str]]:
    """(series key, row label) of the floor's measurements on `cpus` CPUs."""
    rows = [(f"forward_{runtime}_t{threads}", f"forward pass alone, {label}, {plural(threads, 'thread')}")
            for threads in single_thread_counts(cpus) for runtime, label in FORWARD_RUNTIMES]
    for name, size in (("", "400 px JPEG"), ("jpeg12mp_", "12 MP JPEG")):
        for threads in single_thread_counts(cpus):
            rows.append((f"floor_single_{name}t{threads}",
                         f"floor, {size}, single stream, {plural(threads, 'thread')}"))
    for streams, threads, batch in floor_layouts(cpus):
        rows.append((f"floor_streams_{streams}x{threads}_b{batch}",
                     f"floor, 400 px JPEG, {plural(streams, 'stream')} x {plural(threads, 'thread')}, batch {batch}"))
    return rows


ROWS = [
    ("fastai_jpeg400", "fastai learn.predict, 400 px JPEG"),
    ("whatcar_jpeg400_c1", "whatcar HTTP, 400 px JPEG, c=1"),
    ("whatcar_jpeg12mp_c1", "whatcar HTTP, 12 MP JPEG, c=1"),
    ("whatcar_png_c1", "whatcar HTTP, PNG, c=1"),
    ("whatcar_jpeg400_c4", "whatcar HTTP, 400 px JPEG, c=4"),
    ("whatcar_jpeg400_c8", "whatcar HTTP, 400 px JPEG, c=8"),
    ("classify_jpeg400", "make classify, 400 px JPEGs from a folder"),
    ("torchserve_jpeg400_c1", "TorchServe HTTP, 400 px JPEG, c=1"),
    ("torchserve_jpeg400_c8", "TorchServe HTTP, 400 px JPEG, c=8"),
]


def table(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cpus_available']} CPUs available, {m['date']}, "
                 f"load average before {m['loadavg_before'][0]:.2f}, after {m['loadavg_after'][0]:.2f}")
    if "other_cpu_share" in m:
        lines.append(f"other processes used {100 * m['other_cpu_share']:.0f}% of the CPUs during the "
                     f"{m['seconds']:.0f} s run (0% is a quiet machine); {results['rounds']} rounds")
    lines.append("inputs: " + "; ".join(results["inputs"].values()))
    lines.append("whatcar settings: " + (", ".join(f"{k}={v}" for k, v in results["whatcar"]["settings"].items())
                                         or "the defaults"))
    ts = results["torchserve"]
    if "settings" in ts:
        st = ts["settings"]
        lines.append(f"TorchServe: {st['workers']} workers x {st['torch_threads']} thread(s), batch size "
                     f"{st['batch_size']}")
    runtime = results["whatcar"].get("runtime")
    if runtime:
        lines.append(f"whatcar runtime: {runtime['name']} ({runtime['reason']})")
    if results.get("openvino", {}).get("version"):
        lines.append(f"OpenVINO {results['openvino']['version']}, precision {results['openvino']['precision']}")
    for name in ("fastai", "torchserve", "openvino"):
        if "skipped" in results.get(name, {}):
            lines.append(f"{name}: skipped ({results[name]['skipped']})")
    lines.append("")
    lines.append("| measurement | n | p50 ms | p95 ms | p99 ms | per second (median round) |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    series = results["series"]
    for key, label in floor_rows(m["cpus_available"]) + ROWS:
        if key not in series:
            continue
        r = series[key]
        if key.startswith("floor_single"):
            fwd = statistics.median(x["forward_ms"] for x in r["rounds"] if "forward_ms" in x) \
                if any("forward_ms" in x for x in r["rounds"]) else None
            if fwd is not None:
                label += f" (forward {fwd:.1f} ms)"
        latency = r["count"] > 0
        per_second = r["throughput"] if r["throughput"] is not None else (1000 / r["p50_ms"] if latency else None)
        lines.append(f"| {label} | {r['count'] or '-'} | {fmt(r['p50_ms']) if latency else '-'} | "
                     f"{fmt(r['p95_ms']) if latency else '-'} | {fmt(r['p99_ms']) if latency else '-'} | "
                     f"{fmt(per_second)} |")
    lines.append("")
    lines.append("| target | limit | measured (median) | rounds' range | met | detail |")
    lines.append("|---|---:|---:|---:|:---:|---|")
    for t in results["targets"]:
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        limit = f"{t.get('direction', '')} {t['limit']:g}".strip()
        spread = f"{t['range'][0]:.2f}-{t['range'][1]:.2f}" if t.get("range") and len(set(t["range"])) > 1 else "-"
        lines.append(f"| {t['target']} | {limit} | {fmt(t['ratio'], 2)} | {spread} | {met} | {t['detail']} |")
    return "\n".join(lines)


