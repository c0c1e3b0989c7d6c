"""The real server: `python -m serve` in a subprocess on 127.0.0.1, spoken to over sockets.

Everything here is bounded: every socket has a timeout, every wait has a deadline, and every
server started is stopped (SIGTERM, then SIGKILL) when its test ends.
"""

from __future__ import annotations

import http.client
import json
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from ops.launch import Server
from serve.manifest import FORMAT_VERSION
from tests.support.paths import ARTIFACT, ARTIFACTS, ROOT, car_photos
from tests.support.server import clean_env, request, start_server
from tests.support.tiny_artifact import write_manifest, write_tiny_artifact
from tests.support.uploads import encode, multipart

CHANNEL_TIMEOUT = 2
MAX_UPLOAD = 1 << 20


def start(model_dir: Path, log_path: Path, *args: str) -> Server:
    """A server with this module's short channel timeout and upload limit."""
    return start_server(model_dir, log_path, "--channel-timeout", str(CHANNEL_TIMEOUT),
                        "--max-upload-bytes", str(MAX_UPLOAD), *args)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start(ARTIFACTS, tmp_path_factory.mktemp("server") / "server.log", "--threads", "4")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return car_photos()[0].read_bytes()


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    image = Image.open(car_photos()[1]).convert("RGB")
    image.thumbnail((160, 160))
    return encode(image, "JPEG", quality=85)


def test_real_photo_raw_and_multipart(server, photo):
    status, headers, body = request(server.port, "POST", "/predict", photo, {"Content-Type": "image/jpeg"})
    assert status == 200, body
    raw = json.loads(body)["predictions"]
    assert raw and headers["X-Content-Type-Options"] == "nosniff"
    form, content_type = multipart([("file", "car.jpg", photo, "image/jpeg")])
    status, _, body = request(server.port, "POST", "/predict", form, {"Content-Type": content_type})
    assert status == 200, body
    assert json.loads(body)["predictions"] == raw


def test_fifty_concurrent_clients(server, small_jpeg):
    clients, per_client = 50, 2
    form, form_type = multipart([("file", "car.jpg", small_jpeg, "image/jpeg")])
    start = threading.Barrier(clients)
    statuses, errors = [], []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            start.wait(timeout=30)
            for i in range(per_client):  # keep-alive: all of a client's requests on one connection
                if (n + i) % 2:
                    status, _, body = request(server.port, "POST", "/predict", small_jpeg,
                                              {"Content-Type": "image/jpeg"}, conn=conn)
                else:
                    status, _, body = request(server.port, "POST", "/predict", form, {"Content-Type": form_type},
                                              conn=conn)
                statuses.append(status)
                json.loads(body)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none may happen
            errors.append(f"client {n}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert statuses == [200] * (clients * per_client)


def open_slow_upload(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                 b"Content-Length: 100000\r\n\r\n")
    return sock


def seconds_until_closed(sock: socket.socket, limit: float, trickle: bool) -> float:
    """Send a byte a second (if `trickle`) until the server closes the connection; the wait in seconds."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            if trickle:
                sock.send(b"\xff")
            readable, _, _ = select.select([sock], [], [], 1.0)
            if readable and sock.recv(4096) == b"":
                return time.monotonic() - started
        except OSError:  # reset or broken pipe: closed as well
            return time.monotonic() - started
    return float("inf")


def test_slow_client_does_not_block_others_and_is_cut_off(server, small_jpeg):
    slow = open_slow_upload(server.port)
    result = {}
    watcher = threading.Thread(target=lambda: result.setdefault("cut", seconds_until_closed(slow, 20, True)))
    watcher.start()
    try:
        for _ in range(5):
            status, _, _ = request(server.port, "POST", "/predict", small_jpeg, {"Content-Type": "image/jpeg"})
            assert status == 200
        watcher.join(timeout=30)
    finally:
        slow.close()
    # Waitress alone only closes connections that go quiet; a byte a second must still be cut off.
    assert CHANNEL_TIMEOUT - 0.5 <= result["cut"] <= CHANNEL_TIMEOUT + 6, result


def test_idle_connection_is_closed_after_the_channel_timeout(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        waited = seconds_until_closed(sock, 20, False)
    finally:
        sock.close()
    assert CHANNEL_TIMEOUT - 0.5 <= waited <= CHANNEL_TIMEOUT + 6


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length:\s*(\d+)", head)
    while length and len(rest) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(head.split()[1]), head + b"\r\n\r\n" + rest


def test_declared_oversize_body_is_refused_before_it_is_sent(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 50000000\r\n\r\n")
        status, response = read_response(sock)  # not one byte of the 50 MB was sent
    finally:
        sock.close()
    # Waitress answers this itself, in plain text: see MULTIPART_SLACK in serve/server.py.
    assert status == 413 and b"Request Entity Too Large" in response


def test_oversize_upload_sent_whole_still_gets_its_413(server):
    # Browsers and curl send the whole body before reading; without a lingering close the
    # server's reset destroys the 413 and the client sees a broken connection instead.
    for _ in range(3):
        status, _, body = request(server.port, "POST", "/predict", b"\xff" * (16 * MAX_UPLOAD),
                                  {"Content-Type": "image/jpeg"})
        assert status == 413, body


def test_body_just_over_the_limit_gets_a_json_413(server):
    status, headers, body = request(server.port, "POST", "/predict", b"\xff" * (MAX_UPLOAD + 1),
                                    {"Content-Type": "image/jpeg"})
    assert status == 413 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["code"] == "too_large"


def test_chunked_oversize_body_is_cut_short(server):
    total, block = 50_000_000, b"\xff" * 65536
    sent, status, response = 0, None, b""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: stop sending
            try:
                sock.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
            except OSError:
                break
            sent += len(block)
        try:
            status, response = read_response(sock)
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert sent < 16 * MAX_UPLOAD, f"sent {sent} bytes before the server stopped reading"
    assert status == 413, response


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # About 0.1 s a forward pass, so that requests are still in flight when SIGTERM lands.
    return write_tiny_artifact(tmp_path_factory.mktemp("tiny") / "artifact", burn_rounds=300)


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tiny, tmp_path, small_jpeg):
    server = start(tiny, tmp_path / "server.log", "--threads", "4", "--inference-workers", "1")
    clients = 8
    sent = threading.Barrier(clients + 1)
    results: list[tuple[int, float]] = []
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", "/predict", body=small_jpeg, headers={"Content-Type": "image/jpeg"})
            sent.wait(timeout=30)
            resp = conn.getresponse()
            resp.read()
            results.append((resp.status, time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - any client failure is a finding, listed by the test
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    try:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        sent.wait(timeout=30)
        time.sleep(0.2)  # let the server read them all
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        refused_at = None
        while refused_at is None and time.monotonic() - signalled < 5:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                time.sleep(0.02)
            except ConnectionRefusedError:
                refused_at = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        returncode = server.proc.wait(timeout=30)
        exited = time.monotonic()
    finally:
        server.stop()
    assert errors == [] and [status for status, _ in results] == [200] * clients, (errors, results)
    assert max(done for _, done in results) > signalled, "no request was still in flight at SIGTERM"
    assert refused_at is not None, "new connections were still accepted 5 s after SIGTERM"
    assert returncode == 0, server.output()
    # Once the last in-flight answer is out, nothing should hold the process up. (Counted from
    # then, not from the signal: on a loaded machine the slow model alone can take seconds.)
    assert exited - max(done for _, done in results) < 5
    assert "draining" in server.output() and "stopped" in server.output()


def test_inference_error_is_a_json_500_and_the_server_carries_on(tiny, tmp_path, small_jpeg):
    server = start(tiny, tmp_path / "server.log")
    try:
        white = encode(Image.new("RGB", (32, 32), (255, 255, 255)), "PNG")
        status, headers, body = request(server.port, "POST", "/predict", white, {"Content-Type": "image/png"})
        assert status == 500 and headers["Content-Type"].startswith("application/json")
        assert b"Traceback" not in body and b"refuses" not in body
        assert json.loads(body)["title"]
        status, _, _ = request(server.port, "POST", "/predict", small_jpeg, {"Content-Type": "image/jpeg"})
        assert status == 200
    finally:
        server.stop()
    log = server.output()
    assert "unhandled error on POST /predict" in log and "tiny model refuses all-white images" in log


# --- start-up refusals ------------------------------------------------------------------------

def remove_labels(folder: Path, manifest: dict) -> None:
    (folder / "labels.txt").unlink()


def flip_a_model_byte(folder: Path, manifest: dict) -> None:
    with open(folder / "model.pt", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))


def add_a_label(folder: Path, manifest: dict) -> None:
    # Labels and manifest (its class fields too) agree with each other, but not with the model's output.
    with open(folder / "labels.txt", "a", encoding="utf-8") as fh:
        fh.write("Extra Class 2099\n")
    manifest["num_classes"] += 1
    if "classes" in manifest:
        manifest["classes"].append({"label": "Extra Class 2099", "name": "Extra Class 2099", "make": "Extra",
                                    "model": "Class", "body": None, "year": 2099})
    write_manifest(folder, manifest)


def newer_format(folder: Path, manifest: dict) -> None:
    manifest["format_version"] = FORMAT_VERSION + 1
    write_manifest(folder, manifest)


def not_torchscript(folder: Path, manifest: dict) -> None:
    (folder / "model.pt").write_bytes(b"PK\x03\x04 this is not a TorchScript archive" * 100)
    # Without a compiled package, so that model.pt is what has to load.
    if manifest["files"].pop("compiled", None):
        (folder / "model.pt2").unlink()
    write_manifest(folder, manifest)


@pytest.mark.parametrize("breakage, expected", [
    (remove_labels, r"labels.txt is missing"),
    (flip_a_model_byte, r"model.pt sha256 is .* the manifest says"),
    (add_a_label, r"model outputs shape \(1, \d+\) but there are \d+ labels"),
    (newer_format, r"is format \d+, newer than this server understands"),
    (not_torchscript, r"model.pt is not a loadable TorchScript module"),
], ids=["missing-file", "checksum", "label-count", "format-version", "not-torchscript"])
def test_start_up_refuses_a_broken_artifact(tmp_path, breakage, expected):
    folder = tmp_path / "artifact"
    shutil.copytree(ARTIFACT, folder)
    breakage(folder, json.loads((folder / "manifest.json").read_text()))
    done = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(folder), "--port", "0"], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("whatcar: cannot serve") and re.search(expected, lines[0]), lines[0]
