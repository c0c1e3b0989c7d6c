"""The release check on its own: this checkout's server (run from the serve venv) and tiny artifacts,
so that each way a release can fail its check is seen without building a release."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from deploy.check import CheckFailed, check_release, photo_checks
from tests.support.paths import ROOT
from tests.support.server import clean_env
from tests.support.source_repo import LABELS, write_checked_artifact
from tests.support.tiny_artifact import write_manifest

ENV = clean_env()


def run_check(model_dir: Path, tmp_path: Path, ready_timeout: float = 90) -> list[str]:
    return check_release(ROOT, Path(sys.executable), ENV, model_dir, ready_timeout, tmp_path / "server.log")


def test_a_release_that_scores_its_check_photo_passes(tmp_path):
    results = run_check(write_checked_artifact(tmp_path / "model"), tmp_path)
    assert results[0].startswith("ready after") and results[1] == f"red.jpg: {LABELS[0]} (as expected)"
    assert "stopped" in (tmp_path / "server.log").read_text()


def test_a_wrong_top1_fails(tmp_path):
    # The server itself scores the check photos before it listens, so it is the one that refuses.
    model = write_checked_artifact(tmp_path / "model", top1=LABELS[1])
    with pytest.raises(CheckFailed, match=f"red.jpg is scored '{LABELS[0]}' but the export recorded '{LABELS[1]}'"):
        run_check(model, tmp_path)


def test_a_server_that_exits_fails_with_its_reason(tmp_path):
    model = write_checked_artifact(tmp_path / "model")
    manifest = json.loads((model / "manifest.json").read_text())
    (model / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS[::-1]))
    manifest["files"]["labels"]["sha256"] = "0" * 64
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckFailed,
                       match=r"exited with 1 before it was ready: whatcar: cannot serve .*labels.txt sha256"):
        run_check(model, tmp_path)


def test_a_server_that_never_becomes_ready_fails_and_is_stopped(tmp_path):
    # Warming up this model takes minutes: the server never gets to accept a connection.
    model = write_checked_artifact(tmp_path / "model", burn_rounds=2_000_000)
    with pytest.raises(CheckFailed, match=r"was not ready after 8 s"):
        run_check(model, tmp_path, ready_timeout=8)
    # No server is left running: nothing has the log open for writing any more.
    log = tmp_path / "server.log"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        assert str(log) not in fds, f"process {pid} is still running"


def test_a_manifest_without_checks_cannot_prove_it_scores(tmp_path):
    model = write_checked_artifact(tmp_path / "model", checks=False)
    with pytest.raises(CheckFailed, match=r'lists no check photos \("checks"\), so the release cannot show'):
        photo_checks(model)


@pytest.mark.parametrize("change, expected", [
    (lambda m: m["checks"][0].update(sha256="ab" * 32), r"red.jpg sha256 is .*, the manifest says abab"),
    (lambda m: m["checks"][0].update(file="../../etc/passwd"), r"'../../etc/passwd' .* is not a file inside"),
    (lambda m: m["checks"][0].update(file="/etc/passwd"), r"'/etc/passwd' .* is not a file inside"),
    (lambda m: m["checks"][0].update(file="checks/missing.jpg"), r"missing.jpg is missing"),
    (lambda m: m["checks"][0].pop("top1"), r"each of 'checks' needs file, sha256 and top1"),
    (lambda m: m.update(checks={"file": "checks/red.jpg"}), r"'checks' must be a list"),
], ids=["sha256", "escape", "absolute", "missing", "no-top1", "not-a-list"])
def test_check_photos_are_verified_before_any_server_starts(tmp_path, change, expected):
    model = write_checked_artifact(tmp_path / "model")
    manifest = json.loads((model / "manifest.json").read_text())
    change(manifest)
    write_manifest(model, manifest)
    with pytest.raises(CheckFailed, match=expected):
        photo_checks(model)
