"""--ready-file, the server's own word that it answers, and ops/launch.py, which waits for it.

The contract: the file appears once the server listens with its model loaded (when /readyz turns
200, not before), names the port it really listens on (the kernel's choice under --port 0), and is
gone once the server has stopped cleanly.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops.launch import LaunchError
from tests.support.paths import ROOT
from tests.support.server import START_TIMEOUT, clean_env, start_server
from tests.support.tiny_artifact import write_tiny_artifact


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Path:
    # Its warm-up takes seconds: long enough to watch the server while it is not ready yet.
    return write_tiny_artifact(tmp_path_factory.mktemp("slow") / "artifact", burn_rounds=3000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_artifact(tmp_path_factory.mktemp("tiny") / "artifact")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readyz(port: int) -> int | None:
    """/readyz's status, or None when nothing answers (not listening yet)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def names(path: Path, pid: int) -> bool:
    try:
        return json.loads(path.read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def test_the_file_appears_only_once_readyz_answers_200_and_is_gone_after_the_stop(slow, tmp_path):
    port, ready = free_port(), tmp_path / "ready.json"
    # What a server killed earlier left behind: it must not pass for this one's.
    ready.write_text(json.dumps({"pid": 1, "host": "127.0.0.1", "port": port, "url": "stale"}))
    log = tmp_path / "server.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "serve", "--model-dir", str(slow), "--port", str(port),
                                 "--ready-file", str(ready)], cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        seen = []  # (the file was there, as this server's, before the probe; what /readyz said)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            there = ready.exists()
            seen.append((there and names(ready, proc.pid), there, readyz(port)))
            if sum(1 for ours, _, status in seen if ours and status == 200) >= 5:
                break
            time.sleep(0.02)
        ready_content = json.loads(ready.read_text()) if ready.exists() else None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text(errors="replace")
    assert any(ours for ours, _, _ in seen), output
    assert [status for ours, _, status in seen if ours] == [200] * sum(1 for ours, _, _ in seen if ours)
    # The stale file went at start-up, long before this server could answer.
    assert any(not there and status is None for _, there, status in seen), seen[:20]
    assert ready_content == {"pid": proc.pid, "host": "127.0.0.1", "port": port, "url": f"http://127.0.0.1:{port}"}
    assert not ready.exists(), "the ready file outlived the server"


def test_port_0_gets_the_port_the_kernel_chose(tiny, tmp_path):
    with start_server(tiny, tmp_path / "server.log") as server:
        assert server.port != 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert readyz(server.port) == 200  # at once, without a retry
        assert f"listening on {server.url} " in server.output()
        ready_file = Path(server.proc.args[server.proc.args.index("--ready-file") + 1])
        assert json.loads(ready_file.read_text())["pid"] == server.pid
    assert server.returncode == 0
    assert not ready_file.exists()


def test_a_server_that_exits_fails_the_launch_at_once_with_its_last_lines(tiny, tmp_path):
    started = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        start_server(tiny, tmp_path / "server.log", "--threads", "0")
    assert time.monotonic() - started < START_TIMEOUT / 2, "waited for the deadline, not for the exit"
    assert caught.value.reason == "exited with 2 before it was ready" and caught.value.returncode == 2
    assert caught.value.tail[-1].startswith("whatcar: configuration error: threads must be at least 1")


def test_a_server_not_ready_in_time_fails_the_launch_and_is_stopped(slow, tmp_path):
    with pytest.raises(LaunchError, match="the server was not ready after 1 s") as caught:
        start_server(slow, tmp_path / "server.log", timeout=1)
    assert caught.value.returncode == -signal.SIGTERM  # stopped, and waited for

