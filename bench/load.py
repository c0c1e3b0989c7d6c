"""A small HTTP load generator, and what it reads of the servers it drives, all on 127.0.0.1.

Each client thread keeps one HTTP/1.1 connection open and sends the next request as soon as
the last answer is read (a closed loop), so `concurrency` is the number of requests in flight.
Every run is bounded by a request count and by a time limit, whichever comes first.
"""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class LoadResult:
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def summary(self) -> dict:
        lat = self.latencies_ms
        return {
            "concurrency": self.concurrency, "requests": self.ok, "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "throughput_rps": self.ok / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
            "mean_ms": statistics.fmean(lat) if lat else float("nan"), "max_ms": max(lat, default=float("nan")),
        }


def run_load(port: int, path: str, body: bytes, content_type: str, concurrency: int, requests: int,
             seconds: float, warmup: int = 0, timeout: float = 60.0) -> LoadResult:
    """`requests` POSTs (at most, and for at most `seconds`) from `concurrency` keep-alive clients.

    The first `warmup` answers of each client are not counted, so every connection is open and
    every server thread has run once before timing starts."""
    result = LoadResult(concurrency)
    lock = threading.Lock()
    issued = [0]
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    clock = {"started": 0.0, "deadline": 0.0}

    def start_clock():
        # Runs once, when every client has warmed up and before any is released.
        clock["started"] = time.perf_counter()
        clock["deadline"] = clock["started"] + seconds

    barrier = threading.Barrier(concurrency, action=start_clock)

    def claim() -> bool:
        with lock:
            if issued[0] >= requests or time.perf_counter() >= clock["deadline"]:
                return False
            issued[0] += 1
            return True

    def send(conn: http.client.HTTPConnection) -> int:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status

    def client():
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        try:
            for _ in range(warmup):
                send(conn)
        finally:
            barrier.wait()
        try:
            while claim():
                t0 = time.perf_counter()
                try:
                    status = send(conn)
                except (OSError, http.client.HTTPException) as exc:
                    status = type(exc).__name__
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
                elapsed = (time.perf_counter() - t0) * 1000
                with lock:
                    if status == 200:
                        result.latencies_ms.append(elapsed)
                    else:
                        result.errors[str(status)] = result.errors.get(str(status), 0) + 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout * (warmup + 2))
    result.seconds = time.perf_counter() - clock["started"]
    return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get_body(port: int, path: str, timeout: float = 10.0) -> bytes:
    """The body of a GET that must succeed (raises otherwise)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path} answered {resp.status}")
        return body
    finally:
        conn.close()


def rss_mib(pid: int) -> float | None:
    """Resident memory of one process, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (Linux)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        if current in found:
            continue
        found.append(current)
        try:
            stack.extend(int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split())
        except OSError:
            pass
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process tree, its reaped children included."""
    total = 0.0
    for current in tree_pids(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def tree_rss_mib(pid: int) -> float | None:
    """Resident memory of a process and all its descendants (TorchServe is Java plus Python workers)."""
    total, stack, seen = 0.0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        rss = rss_mib(current)
        if rss is None:
            continue
        total += rss
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            children = []
        stack.extend(int(c) for c in children)
    return total or None
