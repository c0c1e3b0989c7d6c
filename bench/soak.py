"""Soak test: a real server under a long mix of good and malformed uploads, watched for leaks.

    python -m bench.soak [--requests 10000] [--clients 4] [--model-dir artifacts]

Starts `python -m serve` on 127.0.0.1 (a free port), sends the requests from a few client threads
over keep-alive connections, then prints what was sent, what failed (a 5xx, an unexpected status
or a connection error), and the server's resident memory and open file descriptors after warm-up
against at the end (from /proc, so Linux only). Exits 1 if anything failed or the server did not
stop cleanly on SIGTERM. Everything stays on loopback and stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import random
import re
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

from PIL import Image

from ops.launch import LaunchError, launch, without_settings

ROOT = Path(__file__).resolve().parent.parent
CARS = ROOT / "tests" / "data" / "cars"
MAX_UPLOAD = 2 * 1024 * 1024
BOUNDARY = "soakboundary"


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def form(name: str, data: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="car.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def build_mix() -> list[tuple[str, int, bytes, str, set[int]]]:
    """(name, weight, body, content type, statuses that count as a correct answer)."""
    photos = sorted(CARS.glob("*/*.jpg"))
    full = photos[0].read_bytes()
    small = Image.open(photos[1]).convert("RGB")
    small.thumbnail((320, 320))
    jpeg = encode(small, "JPEG", quality=85)
    corrupt = bytearray(jpeg)
    for i in range(corrupt.index(b"\xff\xda") + 20, len(corrupt) - 2, 5):
        corrupt[i] ^= 0x5A
    jpeg_type, form_type = "image/jpeg", f"multipart/form-data; boundary={BOUNDARY}"
    ok = {200}
    return [
        ("photo", 10, full, jpeg_type, ok),
        ("small-jpeg", 20, jpeg, jpeg_type, ok),
        ("multipart", 10, form("file", jpeg), form_type, ok),
        ("png-rgba", 5, encode(small.convert("RGBA"), "PNG"), "image/png", ok),
        ("webp", 5, encode(small, "WEBP"), "image/webp", ok),
        ("gif", 3, encode(small, "GIF"), "image/gif", ok),
        ("progressive", 5, encode(small, "JPEG", progressive=True), jpeg_type, ok),
        ("truncated", 8, jpeg[: len(jpeg) // 2], jpeg_type, {400}),
        ("corrupt-entropy", 5, bytes(corrupt), jpeg_type, {200, 400}),
        ("empty", 4, b"", jpeg_type, {400}),
        ("text", 5, b"this is not a car\n" * 20, jpeg_type, {415}),
        ("random", 5, random.Random(3).randbytes(5000), "application/octet-stream", {415}),
        ("bomb", 5, png_claiming(50000, 50000), "image/png", {422}),
        ("no-file-field", 4, form("image", jpeg), form_type, {400}),
        ("wrong-type", 3, jpeg, "text/plain", {415}),
        ("too-large", 1, b"\xff" * (MAX_UPLOAD + 100_000), jpeg_type, {413}),
    ]


def proc_numbers(pid: int) -> tuple[int, int]:
    """(VmRSS in kB, open file descriptors) of a process."""
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()
        self.failures: Counter = Counter()
        self.latencies: list[float] = []
        self.sent = 0


def run_clients(port: int, mix, count: int, clients: int, seed: int, tally: Tally, deadline: float) -> None:
    names = [entry for entry in mix for _ in range(entry[1])]
    per_client = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        conn = None
        for _ in range(per_client[n]):
            if time.monotonic() > deadline:
                return
            name, _, body, content_type, expected = rng.choice(names)
            conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            started = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
                resp = conn.getresponse()
                resp.read()
                status, closing = resp.status, resp.getheader("Connection", "").lower() == "close"
            except (OSError, http.client.HTTPException) as exc:
                status, closing = None, True
                failure = f"{name}: {type(exc).__name__}"
            elapsed = time.perf_counter() - started
            with tally.lock:
                tally.sent += 1
                if status is None:
                    tally.failures[failure] += 1
                else:
                    tally.statuses[status] += 1
                    tally.latencies.append(elapsed)
                    if status >= 500 or status not in expected:
                        tally.failures[f"{name}: {status}"] += 1
            if closing:  # the server said it closes (e.g. its own 413): open a new connection
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=int(os.environ.get("SOAK_REQUESTS", 10000)))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=300, help="requests sent before the baseline is read")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop sending after this long")
    args = parser.parse_args(argv)

    mix = build_mix()
    fd, log = tempfile.mkstemp(prefix="whatcar-soak-", suffix=".log")
    os.close(fd)
    try:
        try:
            server = launch(["--model-dir", str(args.model_dir), "--host", "127.0.0.1", "--port", "0",
                             "--max-upload-bytes", str(MAX_UPLOAD), "--log-level", "INFO"], log=log,
                            env=without_settings(), cwd=ROOT)
        except LaunchError as exc:
            raise SystemExit(f"soak: {exc}") from None
        try:
            deadline = time.monotonic() + args.max_seconds
            warm = Tally()
            run_clients(server.port, mix, args.warmup, args.clients, 1, warm, deadline)
            time.sleep(0.5)  # let the server close the warm-up connections
            rss_before, fds_before = proc_numbers(server.pid)

            tally = Tally()
            started = time.monotonic()
            run_clients(server.port, mix, args.requests, args.clients, 2, tally, deadline)
            wall = time.monotonic() - started
            time.sleep(0.5)
            rss_after, fds_after = proc_numbers(server.pid)
        finally:
            returncode = server.stop(timeout=30)
        server_errors = len(re.findall(r"unhandled error", server.output()))
    finally:
        os.unlink(log)

    latencies = sorted(tally.latencies) or [0.0]
    failures = sum(tally.failures.values()) + warm.sent - sum(warm.statuses.values())
    print(f"requests sent        {tally.sent} (+{warm.sent} warm-up) from {args.clients} clients in {wall:.1f} s "
          f"({tally.sent / wall:.0f}/s)")
    print(f"statuses             {dict(sorted(tally.statuses.items()))}")
    print(f"failures             {failures} (5xx, unexpected status or connection error)"
          + (f": {dict(tally.failures)}" if tally.failures else ""))
    print(f"server-logged errors {server_errors}")
    print(f"latency              p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms")
    print(f"RSS                  {rss_before / 1024:.1f} MB after warm-up, {rss_after / 1024:.1f} MB at the end "
          f"({(rss_after - rss_before) / 1024:+.1f} MB)")
    print(f"open fds             {fds_before} after warm-up, {fds_after} at the end")
    print(f"server exit          {'killed 30 s' if returncode is None else returncode} after SIGTERM")
    return 0 if failures == 0 and server_errors == 0 and returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
