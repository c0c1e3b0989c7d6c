"""The release check: the release's own server, started the way systemd will start it, must become
ready and score every check photo of its model as the model's manifest expects.

A model proves it scores with `checks` in its manifest.json (serve/model/manifest.py), photos inside
the artifact folder with the top-1 the export gave each:

    "checks": [{"file": "checks/00.jpg", "sha256": "<hex>", "top1": "Volvo 240 Sedan 1993"}]

A manifest without checks fails the check: a release that cannot show it scores is not switched to.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ops.launch import LaunchError, last_lines, launch, post
from serve.model.errors import ArtifactError
from serve.model.manifest import Manifest
from serve.model.versions import VersionError, current_folder

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
    """The check photos of the version `model_dir` serves, each present with the sha256 its
    manifest records (read by the server's own manifest code, which needs no virtualenv)."""
    try:
        folder = current_folder(model_dir)
        manifest = Manifest.read(folder)
        checks = [PhotoCheck(manifest.verified(folder, c.file, c.sha256, "check"), c.sha256, c.top1)
                  for c in manifest.checks]
    except (ArtifactError, VersionError) as exc:
        raise CheckFailed(str(exc)) from None
    if not checks:
        raise CheckFailed(f"{folder / 'manifest.json'} lists no check photos (\"checks\"), so the release cannot "
                          "show that it scores; export the model with checks")
    return checks


def score(port: int, check: PhotoCheck) -> str:
    content_type = CONTENT_TYPES.get(check.path.suffix.lower(), "application/octet-stream")
    try:
        status, body = post(port, "/predict?top_k=1", check.path.read_bytes(), content_type, REQUEST_SECONDS)
    except OSError as exc:
        raise CheckFailed(f"POST /predict with {check.path.name}: {exc}") from None
    if status != 200:
        raise CheckFailed(f"POST /predict with {check.path.name} answered {status}: {body[:200]!r}")
    try:
        top = json.loads(body)["predictions"][0]
        return top["label"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise CheckFailed(f"POST /predict with {check.path.name} answered unreadable JSON: {body[:200]!r}") from None


def check_release(root: Path, python: Path, env: dict[str, str], model_dir: Path, ready_timeout: float,
                  server_log: Path) -> list[str]:
    """Run the check; a line per result on success, CheckFailed with one line otherwise."""
    checks = photo_checks(model_dir)
    env = {**env, "WHATCAR_MODEL_DIR": str(model_dir)}  # the model whose checks these are
    sock = listening_socket()
    try:
        try:
            server = launch([], log=server_log, python=python, env=env, cwd=root, timeout=ready_timeout,
                            spawn=functools.partial(spawn_with_socket, sock=sock))
        except LaunchError as exc:
            raise CheckFailed(f"the release's server {exc.reason}: {last_line(exc.tail)}") from None
        with server:
            results = [f"ready after {server.ready_seconds:.1f} s on a spare port ({server.port})"]
            for check in checks:
                label = score(server.port, check)
                if label != check.top1:
                    raise CheckFailed(f"{check.path.name} scored {label!r} first; its manifest expects {check.top1!r}")
                results.append(f"{check.path.name}: {label} (as expected)")
            code = server.stop(STOP_SECONDS)
        if code is None:
            raise CheckFailed(f"the release's server did not stop within {STOP_SECONDS} s of SIGTERM")
        if code != 0:
            raise CheckFailed(f"the release's server exited with {code} on SIGTERM: "
                              f"{last_line(last_lines(server.output()))}")
        return results
    finally:
        sock.close()


def last_line(lines: list[str]) -> str:
    return lines[-1] if lines else ""
