"""`make deploy` and `make deploy-rollback` end to end, into temporary prefixes, and each fault an
upgrade can meet: every one must leave `current` serving the release it served, and the next
deploy must succeed.

One release is built in full (pip installs torch: a minute or two); every later deploy here has
the same requirements and shares that release's virtualenv files, which takes seconds. Each test
works on a hard-linked copy of that first prefix.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from deploy.activation import listening_socket, spawn_with_socket
from deploy.layout import Prefix
from deploy.release import INJECT_VARIABLE, tree_bytes
from tests.support.source_repo import LABELS, commit_all, git, snapshot_repo, use_artifact
from tests.support.uploads import encode

DEPLOY_PYTHON = shutil.which(os.environ.get("WHATCAR_DEPLOY_PYTHON", "python3"))
PIP_ARGS = os.environ.get("WHATCAR_DEPLOY_PIP_ARGS", "")
FULL_BUILD_TIMEOUT = 1800
DEPLOY_TIMEOUT = 300


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WHATCAR_", "LISTEN_"))}
    env.update(extra)
    return env


def run_tool(source: Path, *args: str, env: dict | None = None, timeout: float = DEPLOY_TIMEOUT):
    done = subprocess.run([DEPLOY_PYTHON, "-m", "deploy", *args], cwd=source, env=env or clean_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    print(done.stdout, done.stderr)
    return done


def deploy(source: Path, prefix: Path, *args: str, **kwargs):
    pip = [f"--pip-args={PIP_ARGS}"] if PIP_ARGS else []
    return run_tool(source, "release", "--prefix", str(prefix), *pip, *args, **kwargs)


def rollback(source: Path, prefix: Path):
    return run_tool(source, "rollback", "--prefix", str(prefix))


def failure(done) -> str:
    """The one line that says which step failed."""
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert len(lines) == 1, done.stdout
    return lines[0]


def current(prefix: Path) -> str:
    return os.readlink(prefix / "current").rpartition("/")[2]


def fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    entries = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            entries.append((os.path.relpath(os.path.join(dirpath, name), folder), st.st_size, st.st_mtime_ns))
    return sorted(entries)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline}")
    return found


def assert_still_serving(prefix: Path, first) -> None:
    """`current` names the first release, and not one of its files changed."""
    assert current(prefix) == first.release
    assert fingerprint(prefix / "releases" / first.release) == first.fingerprint


def assert_no_processes_left(prefix: Path, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while processes_mentioning(str(prefix)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(prefix)) == []


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    repo = snapshot_repo(tmp_path_factory.mktemp("source") / "whatcar")
    use_artifact(repo, "A model with a check photo")
    return repo


@pytest.fixture(scope="module")
def first(tmp_path_factory, source):
    """The first deploy, exactly as docs/operations.md has it: `make deploy PREFIX=...`, a full build."""
    work = tmp_path_factory.mktemp("first")
    prefix, tmpdir, cache = work / "prefix", work / "tmp", work / "cache"
    tmpdir.mkdir()
    env = clean_env(TMPDIR=str(tmpdir), XDG_CACHE_HOME=str(cache))
    started = time.monotonic()
    done = subprocess.run(["make", "--no-print-directory", "deploy", f"PREFIX={prefix}", f"PYTHON={DEPLOY_PYTHON}",
                           f"PIP_ARGS={PIP_ARGS}"], cwd=source, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=FULL_BUILD_TIMEOUT)
    seconds = time.monotonic() - started
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    release = current(prefix)
    made = SimpleNamespace(prefix=prefix, release=release, output=done.stdout, seconds=seconds, tmpdir=tmpdir,
                           cache=cache, fingerprint=fingerprint(prefix / "releases" / release), copies=[])
    yield made
    # A gigabyte, shared by the copies: it is only freed once they are gone too.
    for folder in [prefix, *made.copies]:
        shutil.rmtree(folder, ignore_errors=True)


def copy_prefix(first, dest: Path) -> Path:
    """A copy of the first prefix made of hard links: releases are never edited in place."""
    subprocess.run(["cp", "-a", "-l", str(first.prefix), str(dest)], check=True)
    first.copies.append(dest)
    return dest


def clone(source: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(source), str(dest)], check=True)
    return dest


# --- deploy, upgrade, roll back --------------------------------------------------------------------

def test_first_deploy_builds_checks_and_switches(first, source):
    prefix, release = first.prefix, first.release
    root = prefix / "releases" / release
    info = json.loads((root / "release.json").read_text())
    assert info["commit"] == git(source, "rev-parse", "HEAD") and release.endswith(info["commit"][:7])
    assert info["venv"]["linked_from"] is None, "the first release must build its own virtualenv"
    assert info["check"]["results"][1] == f"red.jpg: {LABELS[0]} (as expected)"
    for step in ("code", "model", "venv", "compile", "check", "finish", "switch"):
        assert f"deploy: {step}: " in first.output
    assert (prefix / "history").read_text().split() == [release]
    assert Prefix(prefix).leftovers() == []
    # The code of the commit, not of the working copy, and the commit's artifact.
    server = Path("serve") / "process" / "server.py"
    assert (root / server).read_bytes() == (source / server).read_bytes()
    assert sorted(p.name for p in (root / "ops").glob("*.py")) == sorted(p.name for p in (source / "ops").glob("*.py"))
    assert json.loads((root / "artifacts" / "1" / "manifest.json").read_text())["checks"]
    assert not (root / ".git").exists()
    # pip's cache and temporary files stayed inside the build and went with it.
    assert not (root / ".pip").exists()
    assert list(first.tmpdir.iterdir()) == [], "pip wrote into TMPDIR"
    assert not (first.cache / "pip").exists(), "pip used the user's cache"
    # The virtualenv names its final path, never the temporary one it was built in.
    venv = root / ".venv" / "serve"
    for path in [venv / "pyvenv.cfg", *(p for p in (venv / "bin").iterdir() if p.is_file() and not p.is_symlink())]:
        assert b".build-" not in path.read_bytes(), path
    assert (venv / "bin" / "pip").read_text().startswith(f"#!{venv}/bin/python")
    # The service's own user can read all of it.
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                assert os.stat(path).st_mode & 0o004, f"{path} is not world-readable"
    print(f"first deploy (full build): {first.seconds:.0f} s, {tree_bytes(root)[0] / 1e6:.0f} MB")


def unit_exec_start(source: Path) -> list[str]:
    text = (source / "deploy" / "whatcar.service").read_text()
    line = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    return shlex.split(line.replace("$$", "$"))


def test_serving_from_current_the_way_the_unit_starts_it(first, source, tmp_path):
    prefix = copy_prefix(first, tmp_path / "prefix")
    root = prefix / "releases" / first.release
    before = fingerprint(root)
    sock = listening_socket()
    port = sock.getsockname()[1]
    log = open(tmp_path / "server.log", "wb")
    proc = spawn_with_socket(unit_exec_start(source), sock, cwd=prefix / "current", stdout=log, stderr=log,
                             env=clean_env(PYTHONDONTWRITEBYTECODE="1"))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/predict", body=encode(Image.new("RGB", (40, 30), (255, 0, 0)), "JPEG"),
                     headers={"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200 and body["predictions"][0]["label"] == LABELS[0]
        # Python runs by the release's real path, not through `current`, which a deploy may switch.
        argv0 = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert argv0 == f"{root}/.venv/serve/bin/python"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
        sock.close()
    assert code == 0, (tmp_path / "server.log").read_text()
    assert fingerprint(root) == before, "the server wrote into its release folder"


def test_upgrade_rollback_and_pruning(first, source, tmp_path):
    prefix = copy_prefix(first, tmp_path / "prefix")
    repo = clone(source, tmp_path / "repo")

    def new_commit(text: str) -> None:
        with open(repo / "README.md", "a") as fh:
            fh.write(f"\n{text}\n")
        commit_all(repo, text)

    new_commit("Upgrade B")
    started = time.monotonic()
    done = deploy(repo, prefix)
    upgrade_seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout
    b = current(prefix)
    info = json.loads((prefix / "releases" / b / "release.json").read_text())
    assert b != first.release and info["subject"] == "Upgrade B"
    assert info["venv"]["linked_from"] == first.release and "sharing its virtualenv's files" in done.stdout
    # Shared files cost nothing twice: the upgrade's own bytes are its code and model.
    assert info["own_bytes"] < 100e6 < info["bytes"], info
    assert (prefix / "history").read_text().split() == [first.release, b]
    assert "restart the service to run it: systemctl restart whatcar.service" in done.stdout

    started = time.monotonic()
    back = rollback(repo, prefix)
    rollback_seconds = time.monotonic() - started
    assert back.returncode == 0, back.stdout
    assert current(prefix) == first.release
    assert f"current is {first.release} (was {b})" in back.stdout
    assert_still_serving(prefix, first)

    again = rollback(repo, prefix)
    assert f"FAILED at step 'rollback': there is no release before {first.release}" in failure(again)
    assert current(prefix) == first.release

    # C after the rollback: a rollback from C returns to the first release, never to B.
    new_commit("Upgrade C")
    assert deploy(repo, prefix, "--keep", "2").returncode == 0
    c = current(prefix)
    assert sorted(Prefix(prefix).complete_releases()) == sorted([first.release, b, c])  # B: one of the newest two
    new_commit("Upgrade D")
    done = deploy(repo, prefix, "--keep", "2")
    assert done.returncode == 0, done.stdout
    d = current(prefix)
    assert Prefix(prefix).complete_releases() == sorted([c, d])
    assert f"removed release {first.release}" in done.stdout and f"removed release {b}" in done.stdout
    assert rollback(repo, prefix).returncode == 0 and current(prefix) == c
    assert rollback(repo, prefix).returncode == 1 and current(prefix) == c  # the first release is gone
    # C still runs though the release it shared its virtualenv with was removed.
    python = prefix / "releases" / c / ".venv" / "serve" / "bin" / "python"
    subprocess.run([str(python), "-c", "import torch, falcon, waitress, PIL"], check=True, timeout=120)
    print(f"upgrade: {upgrade_seconds:.1f} s, rollback: {rollback_seconds:.2f} s")


# --- faults --------------------------------------------------------------------------------------------

def can_mount(tmp_path: Path) -> bool:
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True)
    if done.returncode == 0:
        subprocess.run(["umount", str(probe)], check=True)
    return done.returncode == 0


@contextmanager
def mounted(*args: str):
    target = args[-1]
    subprocess.run(["mount", *args], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", target], check=True)


def test_unwritable_prefix(first, source, tmp_path):
    prefix = copy_prefix(first, tmp_path / "prefix")
    if can_mount(tmp_path):
        # Read-only for root as well: a bind mount of the prefix onto itself, remounted read-only.
        with mounted("--bind", str(prefix), str(prefix)):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(prefix)], check=True)
            line = failure(deploy(source, prefix))
        assert "Read-only file system" in line
    else:
        line = failure(deploy(source, prefix, env=clean_env(**{INJECT_VARIABLE: "prefix:EROFS"})))
    assert f"FAILED at step 'prefix': cannot write to {prefix}" in line
    assert f"current is still {first.release}" in line
    assert_still_serving(prefix, first)
    assert deploy(source, prefix).returncode == 0 and current(prefix) != first.release


def test_disk_full_during_the_build(first, source, tmp_path):
    if can_mount(tmp_path):
        # A filesystem with room for the first release and 64 MB more: the next release's own
        # virtualenv (about 900 MB of torch) cannot fit.
        fs = tmp_path / "small"
        fs.mkdir()
        size_mb = int(tree_bytes(first.prefix)[0] / 2**20) + 64
        with mounted("-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(fs)):
            prefix = fs / "prefix"
            subprocess.run(["cp", "-a", str(first.prefix), str(prefix)], check=True)
            free_before = shutil.disk_usage(fs).free
            line = failure(deploy(source, prefix, "--fresh-venv"))
            assert "FAILED at step 'venv': pip install exited with" in line and "No space left on device" in line
            # The failed build is gone: the space it took is free again (but for its log).
            assert shutil.disk_usage(fs).free > free_before - 1e6
            assert Prefix(prefix).leftovers() == []
            assert_still_serving(prefix, first)
            # The next deploy has the same requirements and shares the first release's files.
            assert deploy(source, prefix).returncode == 0 and current(prefix) != first.release
    else:
        prefix = copy_prefix(first, tmp_path / "prefix")
        line = failure(deploy(source, prefix, env=clean_env(**{INJECT_VARIABLE: "venv:ENOSPC"})))
        assert "FAILED at step 'venv': no space left on device" in line
        assert_still_serving(prefix, first)
        assert deploy(source, prefix).returncode == 0 and current(prefix) != first.release


def test_pip_failure(first, source, tmp_path):
    prefix = copy_prefix(first, tmp_path / "prefix")
    # No index and no configuration: pip can find no package, as when a mirror is down.
    env = clean_env(PIP_CONFIG_FILE=os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        env.pop(name, None)
    done = run_tool(source, "release", "--prefix", str(prefix), "--pip-args=--no-index", env=env)
    line = failure(done)
    assert "FAILED at step 'venv': pip install exited with 1: ERROR: Could not find a version" in line, line
    assert f"current is still {first.release}" in line and "(log: " in line
    log = Path(line.rpartition("(log: ")[2].rstrip(")"))
    assert "--no-index" in log.read_text()
    assert Prefix(prefix).leftovers() == []
    assert_still_serving(prefix, first)
    assert deploy(source, prefix).returncode == 0 and current(prefix) != first.release


@pytest.mark.parametrize("artifact, expected", [
    # Its warm-up takes minutes: the server never becomes ready.
    (dict(burn_rounds=2_000_000), r"FAILED at step 'check': the release's server was not ready after 10 s"),
    # The release's own server scores its check photos before it listens, and refuses to start.
    (dict(top1=LABELS[2]), rf"FAILED at step 'check': .*red.jpg is scored '{LABELS[0]}' but the export recorded "
                           rf"'{LABELS[2]}'"),
], ids=["never-ready", "wrong-top1"])
def test_a_release_that_fails_its_check_is_not_switched_to(first, source, tmp_path, artifact, expected):
    prefix = copy_prefix(first, tmp_path / "prefix")
    repo = clone(source, tmp_path / "repo")
    use_artifact(repo, "A broken model", **artifact)
    line = failure(deploy(repo, prefix, "--ready-timeout", "10"))
    assert re.search(expected, line), line
    assert Prefix(prefix).leftovers() == [] and Prefix(prefix).complete_releases() == [first.release]
    assert_no_processes_left(prefix)
    assert_still_serving(prefix, first)
    git(repo, "revert", "--no-edit", "HEAD")
    assert deploy(repo, prefix).returncode == 0 and current(prefix) != first.release


def test_a_model_without_check_photos_is_refused_before_anything_is_built(first, source, tmp_path):
    prefix = copy_prefix(first, tmp_path / "prefix")
    repo = clone(source, tmp_path / "repo")
    use_artifact(repo, "A model without check photos", checks=False)
    done = deploy(repo, prefix)
    assert re.search(r"FAILED at step 'model': .*artifacts/1/manifest.json lists no check photos", failure(done))
    assert "deploy: venv:" not in done.stdout
    assert Prefix(prefix).leftovers() == []
    assert_still_serving(prefix, first)


def start_deploy(source: Path, prefix: Path, *args: str) -> subprocess.Popen:
    pip = [f"--pip-args={PIP_ARGS}"] if PIP_ARGS else []
    return subprocess.Popen([DEPLOY_PYTHON, "-m", "deploy", "release", "--prefix", str(prefix), *pip, *args],
                            cwd=source, env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=answer_ctrl_c)


def answer_ctrl_c() -> None:
    """A shell without job control starts background jobs with Ctrl-C ignored, and Python keeps an
    inherited ignore: put the default back so the interrupt tests test the program, not the shell."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_until(proc: subprocess.Popen, start: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(start):
            return lines
    raise AssertionError(f"the deploy ended before {start!r}:\n{''.join(lines)}")


@pytest.mark.parametrize("step, args, child", [
    ("venv", ["--fresh-venv"], "-m pip install"),
    ("check", [], "-m serve"),  # the release's server, starting
])
def test_a_deploy_killed_midway(first, source, tmp_path, step, args, child):
    prefix = copy_prefix(first, tmp_path / "prefix")
    proc = start_deploy(source, prefix, *args)
    try:
        read_until(proc, f"deploy: {step}: ")
        deadline = time.monotonic() + 120
        while not [p for p in processes_mentioning(str(prefix)) if child in p]:
            assert time.monotonic() < deadline and proc.poll() is None, f"no {child!r} process was seen"
            time.sleep(0.1)
        time.sleep(1.0)
        # Meanwhile nobody else may deploy or roll back in this prefix.
        assert "another deploy or rollback is running" in failure(rollback(source, prefix))
        os.kill(proc.pid, signal.SIGKILL)  # the deploy alone, as the OOM killer or a `kill -9` would
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert_still_serving(prefix, first)
    assert Prefix(prefix).complete_releases() == [first.release], "a half release looks complete"
    assert Prefix(prefix).leftovers(), "nothing was left behind: the kill came too late to test anything"
    # pip or the release's server die with the deploy rather than write on behind it.
    assert_no_processes_left(prefix)
    done = deploy(source, prefix)
    assert done.returncode == 0, done.stdout
    assert "leftovers of an interrupted deploy" in done.stdout
    assert Prefix(prefix).leftovers() == [] and current(prefix) != first.release


def test_a_deploy_interrupted_with_ctrl_c_cleans_up_after_itself(first, source, tmp_path):
    prefix = copy_prefix(first, tmp_path / "prefix")
    proc = start_deploy(source, prefix)
    try:
        lines = read_until(proc, "deploy: check: ")
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    output = "".join(lines) + out
    assert proc.returncode == 1, output
    assert re.search(rf"FAILED at step 'check': interrupted .*; current is still {first.release}", output), output
    assert Prefix(prefix).leftovers() == []
    assert_no_processes_left(prefix)
    assert_still_serving(prefix, first)
    assert deploy(source, prefix).returncode == 0 and current(prefix) != first.release
