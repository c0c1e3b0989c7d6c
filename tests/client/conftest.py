"""A real `python -m serve` on a free loopback port, for clients that talk to it from outside.

These tests run from the test-only client virtualenv (tritonclient, Playwright, numpy); the
server runs from the serve virtualenv, exactly as deployed, so nothing of the client side can
leak into it.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, ROOT

SERVE_PYTHON = Path(os.environ.get("WHATCAR_SERVE_PYTHON", ROOT / ".venv" / "serve" / "bin" / "python"))
START_TIMEOUT = 120
LISTENING = re.compile(rb"listening on http://([0-9.]+):(\d+)")


@dataclass
class Server:
    host: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"{self.host}:{self.port}"

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def predict(self, data: bytes, top_k: int | None = None) -> dict:
        query = "" if top_k is None else f"?top_k={top_k}"
        request = urllib.request.Request(f"{self.url}/predict{query}", data=data, method="POST",
                                         headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())


def wait_until_listening(proc: subprocess.Popen, log: Path) -> tuple[str, int]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_bytes())
        if found:
            return found.group(1).decode(), int(found.group(2))
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    raise RuntimeError(f"the server did not listen within {START_TIMEOUT}s:\n{log.read_text(errors='replace')}")


@contextlib.contextmanager
def running_server(log: Path, model_dir: Path, *args: str, environ: dict | None = None):
    """A `python -m serve` from the serve venv on a port of its own choosing, stopped on exit."""
    assert SERVE_PYTHON.exists(), f"{SERVE_PYTHON} missing; run through `make test-client`, which builds it"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHATCAR_")} | (environ or {})
    # Port 0: the kernel picks a free port and the server logs which, so parallel runs never collide.
    # A file, not a pipe, takes the log: a pipe nobody drains would block the server once full.
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [str(SERVE_PYTHON), "-m", "serve", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0",
             *args], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        host, port = wait_until_listening(proc, log)
        server = Server(host, port, log)
        try:
            server.get_json("/readyz")
        except urllib.error.URLError as exc:
            raise RuntimeError(f"the server listens but is not ready: {exc}") from None
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(log, ARTIFACTS, "--threads", "4", "--inference-workers", "1", "--torch-threads", "1") as srv:
        yield srv


@pytest.fixture(scope="session")
def metadata(server) -> dict:
    return server.get_json("/metadata")
