"""Git repositories to deploy from: this working tree's tracked files as they are now, with a tiny
artifact that carries check photos (so that a release check takes seconds, not a model's load)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from PIL import Image

from tests.support.paths import ROOT
from tests.support.tiny_artifact import write_tiny_artifact

LABELS = ["Alpha Coupe 2001", "Beta Van 2002", "Gamma Sedan 2003"]
GIT_ENV = {"GIT_AUTHOR_NAME": "whatcar tests", "GIT_AUTHOR_EMAIL": "tests@whatcar.invalid",
           "GIT_COMMITTER_NAME": "whatcar tests", "GIT_COMMITTER_EMAIL": "tests@whatcar.invalid"}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}, check=True)
    return done.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def snapshot_repo(dest: Path) -> Path:
    """A new repository whose one commit holds this working tree as it is (tracked files and new ones
    not ignored), so that deploy tests test the code being worked on, committed or not."""
    dest.mkdir(parents=True)
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_symlink():  # artifacts/current
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / name)
        elif src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git(dest, "init", "-q", "-b", "main")
    commit_all(dest, "snapshot of the working tree")
    return dest


def write_checked_artifact(folder: Path, burn_rounds: int = 0, top1: str | None = None,
                           checks: bool = True) -> Path:
    """The tiny model with one check photo: pure red, whose top-1 is the first label."""
    if folder.exists():
        shutil.rmtree(folder)
    write_tiny_artifact(folder, LABELS, burn_rounds=burn_rounds, checks=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    if checks:
        (folder / "checks").mkdir()
        photo = folder / "checks" / "red.jpg"
        Image.new("RGB", (64, 48), (255, 0, 0)).save(photo, "JPEG", quality=95)
        manifest["checks"] = [{"file": "checks/red.jpg", "sha256": hashlib.sha256(photo.read_bytes()).hexdigest(),
                               "top1": top1 or LABELS[0]}]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def use_artifact(repo: Path, message: str, **artifact) -> str:
    """Replace the repository's default model (version 1 of artifacts/, the one git tracks)."""
    write_checked_artifact(repo / "artifacts" / "1", **artifact)
    assert os.readlink(repo / "artifacts" / "current") == "1"
    return commit_all(repo, message)
