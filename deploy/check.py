"""The release check: the release's own server, started the way systemd will start it, must become
ready and score every check photo of its model as the model's manifest expects.

A model proves it scores with `checks` in its manifest.json, photos inside the artifact folder:

    "checks": [{"file": "checks/volvo.jpg", "sha256": "<hex>", "top1": "Volvo 240 Sedan 1993"}]

A manifest without checks fails the check: a release that cannot show it scores is not switched to.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .activation import listening_socket, spawn_with_socket

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
STOP_SECONDS = 20  # the server drains for at most 10 s after SIGTERM
REQUEST_SECONDS = 60


class CheckFailed(Exception):
    pass


@dataclass(frozen=True)
class PhotoCheck:
    path: Path
    sha256: str
    top1: str


def photo_checks(model_dir: Path) -> list[PhotoCheck]:
    """The manifest's check photos, each present and with the sha256 it records."""
    manifest_path = model_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"cannot read {manifest_path}: {exc}") from None
    entries = manifest.get("checks") if isinstance(manifest, dict) else None
    if not entries:
        raise CheckFailed(f"{manifest_path} lists no check photos (\"checks\"), so the release cannot show that "
                          "it scores; export the model with checks")
    if not isinstance(entries, list):
        raise CheckFailed(f"{manifest_path}: \"checks\" must be a list")
    checks = []
    for n, entry in enumerate(entries):
        where = f"{manifest_path} checks[{n}]"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("file", "sha256", "top1")):
            raise CheckFailed(f"{where} needs \"file\", \"sha256\" and \"top1\" strings")
        relative = PurePosixPath(entry["file"])
        if relative.is_absolute() or ".." in relative.parts:
            raise CheckFailed(f"{where}: {entry['file']} must be a path inside the artifact folder")
        if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise CheckFailed(f"{where}: sha256 must be 64 hex digits")
        path = model_dir / relative
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise CheckFailed(f"check photo {path}: {exc.strerror or exc}") from None
        if digest != entry["sha256"]:
            raise CheckFailed(f"check photo {path} has sha256 {digest[:12]}..., the manifest says {entry['sha256'][:12]}...")
        checks.append(PhotoCheck(path, digest, entry["top1"]))
    return checks


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_SECONDS)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until_ready(proc: subprocess.Popen, port: int, timeout: float, server_log: Path) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise CheckFailed(f"the release's server exited with {code} before it was ready: {last_line(server_log)}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CheckFailed(f"the release's server was not ready after {timeout:g} s: {last_line(server_log)}")
        try:
            # The socket is already listening, so this connects at once and waits in the queue
            # until the server has loaded its model and starts accepting.
            if get(port, "/readyz", min(2.0, remaining))[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)


def score(port: int, check: PhotoCheck) -> str:
    content_type = CONTENT_TYPES.get(check.path.suffix.lower(), "application/octet-stream")
    try:
        status, body = post(port, "/predict?top_k=1", check.path.read_bytes(), content_type)
    except OSError as exc:
        raise CheckFailed(f"POST /predict with {check.path.name}: {exc}") from None
    if status != 200:
        raise CheckFailed(f"POST /predict with {check.path.name} answered {status}: {body[:200]!r}")
    try:
        top = json.loads(body)["predictions"][0]
        return top["label"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise CheckFailed(f"POST /predict with {check.path.name} answered unreadable JSON: {body[:200]!r}") from None


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM, as systemd stops it; None if it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def check_release(root: Path, python: Path, env: dict[str, str], model_dir: Path, ready_timeout: float,
                  server_log: Path) -> list[str]:
    """Run the check; a line per result on success, CheckFailed with one line otherwise."""
    checks = photo_checks(model_dir)
    env = {**env, "WHATCAR_MODEL_DIR": str(model_dir)}  # the model whose checks these are
    sock = listening_socket()
    port = sock.getsockname()[1]
    proc = None
    try:
        with open(server_log, "ab") as log:
            proc = spawn_with_socket([str(python), "-m", "serve"], sock, cwd=root, env=env,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        ready_after = wait_until_ready(proc, port, ready_timeout, server_log)
        results = [f"ready after {ready_after:.1f} s on a spare port ({port})"]
        for check in checks:
            label = score(port, check)
            if label != check.top1:
                raise CheckFailed(f"{check.path.name} scored {label!r} first; its manifest expects {check.top1!r}")
            results.append(f"{check.path.name}: {label} (as expected)")
        code = stop(proc)
        if code is None:
            raise CheckFailed(f"the release's server did not stop within {STOP_SECONDS} s of SIGTERM")
        if code != 0:
            raise CheckFailed(f"the release's server exited with {code} on SIGTERM: {last_line(server_log)}")
        return results
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
