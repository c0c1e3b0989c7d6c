"""Building a release's contents: the code of one commit, its serve virtualenv, its bytecode."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path
from typing import IO

from .errors import StepFailed

REQUIREMENTS = "requirements-serve.txt"
VENV = Path(".venv") / "serve"


def run(step: str, argv: list[str], log: IO[bytes], what: str, **popen) -> None:
    """Run a build command with its output in the log; StepFailed naming its last error line."""
    log.write(f"$ {' '.join(argv)}\n".encode())
    log.flush()
    start = log.tell()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=die_with_parent, **popen)
    except OSError as exc:
        raise StepFailed(step, f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        log.flush()
        raise StepFailed(step, f"{what} exited with {done.returncode}: {error_line(log.name, start)}")


def error_line(log_path: str, start: int) -> str:
    """The line of a command's output that best says why it failed: pip's ERROR lines, else the last."""
    with open(log_path, "rb") as fh:
        fh.seek(start)
        lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    for line in lines:
        if line.startswith("ERROR:") or "No space left on device" in line:
            return line
    return lines[-1] if lines else "(no output)"


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def die_with_parent() -> None:
    """In the child: be killed if the deploy dies, so that a deploy killed midway leaves no pip
    writing into a folder the next deploy removes."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def commit_of(source: Path) -> tuple[str, str, list[str]]:
    """(commit, subject, files with uncommitted changes) of the repository at `source`."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise StepFailed("code", f"cannot run git: {exc.strerror or exc}") from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            raise StepFailed("code", f"git {args[0]} in {source} failed: {lines[-1]}")
        return done.stdout.rstrip()  # not lstrip: `git status --porcelain` lines start with a space

    commit = git("rev-parse", "--verify", "HEAD^{commit}")
    subject = git("log", "-1", "--format=%s", commit)
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return commit, subject, changed


def export_code(source: Path, commit: str, dest: Path) -> None:
    """The tree of `commit` (never the working copy) into `dest`, through git archive."""
    proc = subprocess.Popen(["git", "-C", str(source), "archive", "--format=tar", commit],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(dest, filter="data")
            else:  # Pythons before the extraction filters; the archive is this repository's own tree
                archive.extractall(dest)
    except tarfile.TarError as exc:
        proc.kill()
        raise StepFailed("code", f"git archive {commit[:12]} could not be unpacked: {exc}") from None
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise StepFailed("code", f"git archive {commit[:12]} failed: {stderr.splitlines()[-1] if stderr else code}")
    # serve/ imports ops/ (standard library code it shares with this tool): a release needs both.
    if not (dest / REQUIREMENTS).is_file() or not (dest / "serve").is_dir() or not (dest / "ops").is_dir():
        raise StepFailed("code", f"commit {commit[:12]} has no {REQUIREMENTS}, serve/ or ops/: not a whatcar tree")


def build_venv(root: Path, scratch: Path, python: str, pip_args: list[str], log: IO[bytes]) -> None:
    """A new virtualenv in root/.venv/serve from root's requirements file.

    pip's cache and temporary files go to `scratch`, inside the release being built, and are removed
    with it: pip never fills another filesystem (a small /tmp) or leaves a cache behind."""
    venv = root / VENV
    for sub in ("cache", "tmp"):
        (scratch / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PIP_CACHE_DIR": str(scratch / "cache"), "TMPDIR": str(scratch / "tmp"),
           "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV", "PIP_TARGET", "PIP_PREFIX",
                 "PIP_USER"):
        env.pop(name, None)
    try:
        run("venv", [python, "-m", "venv", str(venv)], log, "python -m venv", env=env)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        run("venv", [*pip, "install", "--no-warn-script-location", *pip_args, "-r", str(root / REQUIREMENTS)],
            log, "pip install", env=env)
        run("venv", [*pip, "check"], log, "pip check", env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def link_venv(source_venv: Path, root: Path) -> int:
    """A copy of an identical release's virtualenv in root/.venv/serve, made of hard links.

    Its files are shared, not duplicated: releases are never edited in place, and deleting one
    release leaves the other's links whole. The few files that name the virtualenv's own path
    (scripts' #! lines, activate, pyvenv.cfg) are rewritten for the new place. Returns the number
    of files linked."""
    target = root / VENV
    old, new = str(source_venv).encode(), str(target).encode()
    linked = 0
    for dirpath, dirnames, filenames in os.walk(source_venv):
        here = Path(dirpath)
        dest = target / here.relative_to(source_venv)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copystat(here, dest)
        for name in dirnames + filenames:
            src = here / name
            if src.is_symlink():
                os.symlink(os.readlink(src), dest / name)
                if name in dirnames:
                    dirnames.remove(name)
            elif name in filenames:
                if here == source_venv / "bin" or (here == source_venv and name == "pyvenv.cfg"):
                    data = src.read_bytes()
                    if old in data:
                        (dest / name).write_bytes(data.replace(old, new))
                        shutil.copymode(src, dest / name)
                        continue
                os.link(src, dest / name)
                linked += 1
    return linked


def compile_code(root: Path, log: IO[bytes]) -> None:
    """Bytecode for the release's own code: the service cannot write it, its folder being read-only.
    (The virtualenv's packages were compiled by pip.)"""
    python = str(root / VENV / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    run("compile", [python, "-m", "compileall", "-q", "-x", r"/\.venv/", str(root)], log, "compileall", env=env)
