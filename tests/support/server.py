"""A real `python -m serve` for a test, started through ops/launch.py, and requests to it.

Standard library only (besides ops/): the client tests import it from a virtualenv without torch.
Every wait has a deadline and every socket a timeout; a server is stopped (SIGTERM, then SIGKILL)
by stop() or on leaving its with-block.
"""

from __future__ import annotations

import http.client
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ops.launch import Server, launch, without_settings
from tests.support.paths import ROOT

START_TIMEOUT = 120  # loading and warming a model on a busy 2-core machine


def clean_env(environ: dict | None = None) -> dict:
    """This environment without any WHATCAR_* setting (a developer's own must not change a test),
    with `environ` on top."""
    return without_settings() | (environ or {})


def start_server(model_dir: Path, log: Path, *args: str, environ: dict | None = None,
                 python: str | Path = sys.executable, timeout: float = START_TIMEOUT) -> Server:
    """`python -m serve` on 127.0.0.1 and a port of its own choosing (--port 0), ready."""
    return launch(["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0", *args], log=log,
                  python=python, env=clean_env(environ), cwd=ROOT, timeout=timeout)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30, conn: http.client.HTTPConnection | None = None):
    """(status, headers, body) of one request, on `conn` if given (kept open) or a new connection."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        if own:
            conn.close()


@dataclass(frozen=True)
class Client:
    """A running server as the client tests see it: an address, and JSON answers (a status other
    than 200 fails the test that asked)."""
    host: str
    port: int

    @classmethod
    def of(cls, server: Server) -> Client:
        return cls(server.host, server.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"{self.host}:{self.port}"

    def get_json(self, path: str) -> dict:
        return self._json(request(self.port, "GET", path))

    def predict(self, data: bytes, top_k: int | None = None) -> dict:
        query = "" if top_k is None else f"?top_k={top_k}"
        return self._json(request(self.port, "POST", f"/predict{query}", data, {"Content-Type": "image/jpeg"}))

    @staticmethod
    def _json(answer) -> dict:
        status, _, body = answer
        assert status == 200, (status, body[:500])
        return json.loads(body)
