"""Model swaps in a real `python -m serve`: through the repository API under load, on SIGHUP, and
through `make reload` and `make rollback`, each checked from outside over HTTP."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from serve.versions import ModelFolder
from tests.support.paths import ROOT
from tests.support.server import request, start_server
from tests.support.tiny_artifact import add_tiny_version

TOKEN = "swap-test-token-0123456789"
CLIENTS = 8
SWAPS = 10


def red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (240, 40, 20)).save(buffer, "PNG")
    return buffer.getvalue()


def predict(port: int) -> tuple[int, dict | None]:
    status, _, body = request(port, "POST", "/predict", red_png(), {"Content-Type": "image/png"}, timeout=60)
    return status, json.loads(body) if status == 200 else None


def reload_status(port: int) -> dict:
    return json.loads(request(port, "GET", "/metadata")[2])["reload"]


@pytest.fixture()
def model_dir(tmp_path):
    folder = tmp_path / "models"
    add_tiny_version(folder, burn_rounds=40)
    add_tiny_version(folder, burn_rounds=40, labels=["Delta Coupe 2011", "Epsilon Van 2012", "Zeta Sedan 2013"])
    return folder


def test_ten_swaps_under_eight_clients_drop_nothing_and_switch_cleanly(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path / "server.log", "--model-control", "explicit", "--threads", "12",
                          environ={"WHATCAR_ADMIN_TOKEN": TOKEN})
    answers, failures, stop = [], [], threading.Event()
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, body = predict(server.port)
            except OSError as exc:
                status, body = type(exc).__name__, None
            with lock:
                if status == 200:
                    answers.append((started, time.monotonic(), body["model"]["version"]))
                else:
                    failures.append(status)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    swaps = []
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        for i in range(SWAPS):
            version = "1" if i % 2 == 0 else "2"
            asked = time.monotonic()
            status, _, body = request(server.port, "POST", "/v2/repository/models/tiny-test/load",
                                      json.dumps({"parameters": {"version": version}}).encode(),
                                      {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                                      timeout=120)
            assert status == 200, body
            swaps.append((asked, time.monotonic(), version))
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.stop()
    assert not failures, failures
    assert {version for _, _, version in answers} == {"1", "2"}
    # A request sent after a load call returned is scored by the version it loaded, until the next one.
    for (_, loaded, version), following in zip(swaps, swaps[1:] + [(float("inf"), None, None)]):
        after = [v for started, _, v in answers if loaded < started < following[0]]
        assert after and set(after) == {version}, (version, after)
    assert len(answers) > 50


def test_sighup_and_make_reload_load_the_current_version(model_dir, tmp_path):
    pid_file = tmp_path / "run" / "serve.pid"
    models = ModelFolder(model_dir)
    models.switch_to("1")
    server = start_server(model_dir, tmp_path / "server.log", "--pid-file", str(pid_file))
    try:
        assert int(pid_file.read_text()) == server.proc.pid
        assert predict(server.port)[1]["model"]["version"] == "1"

        models.switch_to("2")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while reload_status(server.port)["outcome"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert predict(server.port)[1]["model"]["version"] == "2"

        # make reload: the same signal, then the outcome read back from /metadata.
        models.switch_to("1")
        done = subprocess.run(["make", "--no-print-directory", "-s", "reload", f"PID_FILE={pid_file}",
                               f"PORT={server.port}", f"PYTHON={sys.executable}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "now serving version 1" in done.stdout
        assert predict(server.port)[1]["model"]["version"] == "1"

        # make rollback: back to the version served before, in one step.
        done = subprocess.run(["make", "--no-print-directory", "-s", "rollback", f"MODEL_DIR={model_dir}",
                               f"PID_FILE={pid_file}", f"PORT={server.port}", f"PYTHON={sys.executable}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "current is now version 2 (was 1)" in done.stdout and "now serving version 2" in done.stdout
        assert predict(server.port)[1]["model"]["version"] == "2"

        # A version that fails its checks: the control command says so and exits 1; 2 still serves.
        broken = add_tiny_version(model_dir)
        (model_dir / broken / "labels.txt").write_text("tampered\n")
        done = subprocess.run([sys.executable, "-m", "serve.control", "reload", "--pid-file", str(pid_file),
                               "--url", f"http://127.0.0.1:{server.port}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and f"reload of version {broken} failed" in done.stderr + done.stdout
        assert "version 2 still serves" in done.stderr + done.stdout
        assert predict(server.port)[1]["model"]["version"] == "2"
    finally:
        server.stop()
    assert not pid_file.exists(), "the pid file outlived the server"
    assert "reload of version 3 failed" in server.output()


def test_make_reload_without_a_server_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-m", "serve.control", "reload", "--pid-file", str(tmp_path / "none.pid")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "is `make serve` running" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
