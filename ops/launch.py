"""Starting `python -m serve` and knowing when it answers, the one way the benchmarks, the deploy
check and the tests do it.

The server says by itself when it is ready: given --ready-file, it writes {"pid", "host", "port",
"url"} there in one rename once it listens with its model loaded (the moment /readyz turns 200),
and removes it when it stops cleanly. So nothing here polls HTTP or reads the log for a port, and
--port 0 works: the file holds the port the kernel chose.

Standard library only: the deploy tool runs this under the system's Python, outside every virtualenv.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

START_SECONDS = 120.0  # loading and warming the model on a busy two-core machine
STOP_SECONDS = 20.0  # the server drains for at most 10 s after SIGTERM
POLL_SECONDS = 0.01  # one failed open() a poll: cheap, and fine enough for the cold-start times bench takes
TAIL_LINES = 20


class LaunchError(RuntimeError):
    """The server exited, or was still not ready at the deadline (it has been stopped since).

    `reason` says which ("exited with 1 before it was ready"); `tail` holds the last lines it
    logged, the last of them usually the one that says why."""

    def __init__(self, reason: str, tail: list[str], returncode: int | None):
        self.reason, self.tail, self.returncode = reason, tail, returncode
        super().__init__(f"the server {reason}" + ("; it logged:\n" + "\n".join(tail) if tail else ""))


class Server:
    """A started `python -m serve`, ready. Stop it with stop(), or use it as a context manager."""

    def __init__(self, proc: subprocess.Popen, ready: dict, log: Path, log_start: int, folder: Path,
                 ready_seconds: float):
        self.proc = proc
        self.host: str = ready["host"]
        self.port: int = ready["port"]
        self.url: str = ready["url"]
        self.log = log
        self.ready_seconds = ready_seconds  # from the spawn until the ready file appeared
        self._log_start = log_start
        self._folder = folder

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        """What this server has logged so far (the log may hold earlier runs' lines before it)."""
        return logged_since(self.log, self._log_start)

    def stop(self, timeout: float = STOP_SECONDS) -> int | None:
        """SIGTERM, as systemd stops it, and wait for the exit; its code, or None if it was still
        running after `timeout` seconds and had to be killed."""
        try:
            return terminate(self.proc, timeout)
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def post(port: int, path: str, body: bytes, content_type: str, timeout: float,
         host: str = "127.0.0.1") -> tuple[int, bytes]:
    """(status, body) of one POST to a started server, on a connection of its own."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def without_settings(environ=os.environ) -> dict:
    """`environ` without any WHATCAR_* setting: for a server whose settings are its arguments alone."""
    return {k: v for k, v in environ.items() if not k.startswith("WHATCAR_")}


def launch(args: list[str], *, log: str | os.PathLike, python: str | os.PathLike = sys.executable,
           env: dict | None = None, cwd: str | os.PathLike | None = None, timeout: float = START_SECONDS,
           spawn: Callable[..., subprocess.Popen] = subprocess.Popen) -> Server:
    """Start `python -m serve *args` and return once it is ready, or raise LaunchError.

    Its stdout and stderr are appended to `log` (a file, not a pipe: a pipe nobody drains would
    block the server once full). `env` is its whole environment (this one when None), `python`
    the interpreter whose packages it runs with. `spawn` starts the process, given the command
    line and Popen's keyword arguments: deploy's socket activation hands a listening socket over
    through it."""
    log = Path(log)
    folder = Path(tempfile.mkdtemp(prefix="whatcar-launch-"))
    ready_file = folder / "ready.json"
    try:
        with open(log, "ab") as sink:
            log_start = sink.seek(0, os.SEEK_END)
            started = time.monotonic()
            proc = spawn([os.fspath(python), "-m", "serve", *args, "--ready-file", str(ready_file)],
                         cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    server = None
    try:
        ready = wait_for_ready_file(proc, ready_file, started + timeout)
        if ready is not None:
            server = Server(proc, ready, log, log_start, folder, time.monotonic() - started)
    finally:
        if server is None:  # not ready, or interrupted while waiting
            exited = proc.poll()
            code = terminate(proc, STOP_SECONDS)
            shutil.rmtree(folder, ignore_errors=True)
    if server is None:
        reason = (f"was not ready after {timeout:g} s" if exited is None
                  else f"exited with {exited} before it was ready")
        raise LaunchError(reason, last_lines(logged_since(log, log_start)), code)
    return server


def wait_for_ready_file(proc: subprocess.Popen, path: Path, deadline: float) -> dict | None:
    """The ready file's content once it appears; None if the process exits first or time runs out."""
    while True:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):  # ValueError: not JSON, so not written by the server
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(POLL_SECONDS)


def terminate(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code, None if it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def logged_since(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def last_lines(text: str, count: int = TAIL_LINES) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()][-count:]
