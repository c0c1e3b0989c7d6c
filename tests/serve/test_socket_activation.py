"""systemd socket activation: the server takes an already-listening socket from LISTEN_FDS, and a
restart on that socket answers every connection instead of refusing any."""

from __future__ import annotations

import functools
import http.client
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from deploy.activation import listening_socket, spawn_with_socket
from ops.launch import Server, launch
from serve.config import ConfigError
from serve.server import inherited_socket
from tests.support.paths import ROOT
from tests.support.server import START_TIMEOUT, clean_env
from tests.support.tiny_artifact import write_tiny_artifact
from tests.support.uploads import encode
from tests.support.waiting import wait_for


def activation_env(pid: int, count: str = "1") -> dict:
    return {"LISTEN_PID": str(pid), "LISTEN_FDS": count, "LISTEN_FDNAMES": "whatcar", "OTHER": "kept"}


# --- the protocol, in process -----------------------------------------------------------------------

def test_takes_the_listening_socket_meant_for_this_process_and_clears_the_variables():
    sock = listening_socket()
    try:
        environ = activation_env(os.getpid())
        got = inherited_socket(environ, os.getpid(), first_fd=sock.fileno())
        assert got is not None and got.fileno() == sock.fileno()
        assert got.getsockname() == sock.getsockname()
        assert not os.get_inheritable(sock.fileno()), "an inherited socket must be close-on-exec"
        assert environ == {"OTHER": "kept"}
        got.detach()
    finally:
        sock.close()


@pytest.mark.parametrize("environ", [
    {},
    {"LISTEN_FDS": "1"},
    {"LISTEN_PID": "{pid}"},
    activation_env(1),  # meant for another process (this one inherited them)
    activation_env(0, "0"),
    {"LISTEN_PID": "{pid}", "LISTEN_FDS": "0"},
], ids=["none", "no-pid", "no-count", "other-process", "zero-pid", "zero-fds"])
def test_without_a_socket_meant_for_it_the_server_binds_its_own(environ):
    environ = {k: v.format(pid=os.getpid()) for k, v in environ.items()}
    assert inherited_socket(environ, os.getpid(), first_fd=9999) is None
    assert not any(name.startswith("LISTEN_") for name in environ)


def test_refuses_what_it_cannot_serve_on():
    pid = os.getpid()
    with pytest.raises(ConfigError, match="LISTEN_PID='x' is not a process id"):
        inherited_socket({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, pid)
    with pytest.raises(ConfigError, match="LISTEN_FDS='-1' is not a count"):
        inherited_socket(activation_env(pid, "-1"), pid)
    with pytest.raises(ConfigError, match="LISTEN_FDS=2: whatcar answers on one socket"):
        inherited_socket(activation_env(pid, "2"), pid)
    read_end, write_end = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unlistened = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(ConfigError, match=f"descriptor {read_end} .* is not a socket"):
            inherited_socket(activation_env(pid), pid, first_fd=read_end)
        with pytest.raises(ConfigError, match="is not a TCP socket"):
            inherited_socket(activation_env(pid), pid, first_fd=udp.fileno())
        with pytest.raises(ConfigError, match="is a TCP socket that is not listening"):
            inherited_socket(activation_env(pid), pid, first_fd=unlistened.fileno())
        os.fstat(udp.fileno())  # a refused descriptor is left open for its owner
    finally:
        os.close(read_end)
        os.close(write_end)
        udp.close()
        unlistened.close()


# --- a real server process -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_artifact(tmp_path_factory.mktemp("activation") / "artifact")


@pytest.fixture(scope="module")
def red_jpeg() -> bytes:
    return encode(Image.new("RGB", (32, 32), (250, 10, 10)), "JPEG", quality=90)


def start(sock: socket.socket, model_dir: Path, log_path: Path) -> Server:
    """A server on `sock`, as systemd starts it; --port 1 shows that the flag is then not used."""
    return launch(["--model-dir", str(model_dir), "--port", "1", "--threads", "4"], log=log_path, env=clean_env(),
                  cwd=ROOT, timeout=START_TIMEOUT, spawn=functools.partial(spawn_with_socket, sock=sock))


class Clients:
    """Threads posting one image per new connection, back to back, each noting when it connected,
    when it was answered and with what (a status, or the error instead of one)."""

    def __init__(self, port: int, body: bytes, threads: int = 4):
        self.port, self.body = port, body
        self.results: list[tuple[float, float, object]] = []
        self.running = True
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while self.running:
            sent = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=START_TIMEOUT)
            try:
                conn.request("POST", "/predict", body=self.body, headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                resp.read()
                outcome: object = resp.status
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                outcome = f"{type(exc).__name__}: {exc}"
            finally:
                conn.close()
            self.results.append((sent, time.monotonic(), outcome))
            time.sleep(0.02)

    def answered_after(self, moment: float) -> int:
        return sum(1 for _, done, outcome in self.results if done > moment and outcome == 200)

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(timeout=START_TIMEOUT + 10)


def test_requests_before_ready_and_across_a_restart_are_all_answered(tiny, tmp_path, red_jpeg):
    sock = listening_socket()
    port = sock.getsockname()[1]
    log_path = tmp_path / "servers.log"
    started = time.monotonic()
    # Sending before the first server even starts: those requests can only wait in the socket's queue.
    clients = Clients(port, red_jpeg)
    first = second = None
    try:
        first = start(sock, tiny, log_path)
        assert first.port == port, "the ready file names the inherited socket's port, not --port"
        wait_for(lambda: clients.answered_after(started) >= 8, "the first server's answers")
        first_ready = min(done for _, done, outcome in clients.results if outcome == 200)
        assert any(sent < first_ready for sent, _, _ in clients.results)
        assert first.stop() == 0
        first_gone = time.monotonic()
        time.sleep(1.0)  # no server at all: connections can only wait in the socket's queue
        second = start(sock, tiny, log_path)
        wait_for(lambda: clients.answered_after(first_gone) >= 8, "the second server's answers")
        clients.stop()
        assert second.stop() == 0
    finally:
        clients.stop()
        for server in (first, second):
            if server is not None:
                server.stop()
        sock.close()
    log = log_path.read_text(errors="replace")
    failures = [outcome for _, _, outcome in clients.results if outcome != 200]
    assert failures == [], f"{len(failures)} of {len(clients.results)} requests failed: {failures[:5]}\n{log}"
    second_ready = min(done for sent, done, _ in clients.results if sent >= first_gone)
    assert any(first_gone <= sent < second_ready for sent, _, _ in clients.results), \
        "no request was sent while no server was running"
    assert log.count("(inherited socket)") == 2, log
    assert re.search(rf"serving the socket inherited from the service manager \(http://127\.0\.0\.1:{port}\); "
                     r"--host/--port \(127\.0\.0\.1:1\) are not used", log), log
