"""ops/atomic.py: a file or a symlink is replaced whole or not at all, and durably."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ops import atomic
from tests.support.paths import ROOT
from tests.support.syncs import record_syncs, synced


def kill_before_rename(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a process that dies the moment it would rename anything into place, as a
    power cut or a SIGKILL between writing and renaming would leave it."""
    prelude = "import os; os.replace = lambda *args: os._exit(9); from ops import atomic; "
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_the_new_content_replaces_the_old_whole(tmp_path):
    path = tmp_path / "notes.txt"
    atomic.write_text(path, "first\n")
    atomic.write_text(path, "second\n")
    atomic.write_bytes(tmp_path / "blob", b"\x00\x01")
    assert path.read_text() == "second\n" and (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "notes.txt"]


def test_a_buffer_is_written_as_it_is(tmp_path):
    buffer = io.BytesIO(b"weights" * 1000)
    atomic.write_bytes(tmp_path / "checkpoint.pth", buffer.getbuffer())
    assert (tmp_path / "checkpoint.pth").read_bytes() == b"weights" * 1000


def test_the_file_and_then_its_folder_are_synced_around_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    events = record_syncs(monkeypatch)
    atomic.write_text(path, "{}\n")
    assert events == [synced(path), ("rename", path.name), synced(tmp_path)]


def test_a_failure_before_the_rename_leaves_the_old_content_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "history"
    path.write_text("A\n")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(path, "A\nB\n")
    assert path.read_text() == "A\n" and [p.name for p in tmp_path.iterdir()] == ["history"]


def test_an_error_while_writing_leaves_the_old_content(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(path, binary=True) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("the serializer failed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_a_writer_killed_before_the_rename_leaves_the_old_content_and_a_findable_leftover(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"version": 1}\n')
    done = kill_before_rename(f"atomic.write_text({str(path)!r}, '{{\"version\": 2}}')")
    assert done.returncode == 9, done.stderr
    assert json.loads(path.read_text()) == {"version": 1}
    left = atomic.leftovers(path)
    assert len(left) == 1 and left[0].read_text() == '{"version": 2}'
    assert atomic.leftovers(tmp_path / "other") == []


def test_the_mode_of_the_replaced_file_is_kept_or_the_one_asked_for(tmp_path):
    path = tmp_path / "release.json"
    path.write_text("{}")
    path.chmod(0o640)
    atomic.write_text(path, "{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    atomic.write_text(path, "{}\n", mode=0o444)
    assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path):
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "serve.pid", "1\n")
        (tmp_path / "plain").write_text("1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "serve.pid").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "serve.pid").stat().st_mode) == 0o640


def test_a_symlink_is_switched_without_ever_being_missing(tmp_path):
    for name in ("1", "2"):
        (tmp_path / name).mkdir()
    link = tmp_path / "current"
    atomic.point_symlink(link, "1")
    assert os.readlink(link) == "1"
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not link.is_symlink():
                missing.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(300):
            atomic.point_symlink(link, "2")
            atomic.point_symlink(link, "1")
    finally:
        stop.set()
        watcher.join()
    assert missing == [], "the link was missing while it was switched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "current"]


def test_a_symlink_switch_is_synced_to_its_folder(tmp_path, monkeypatch):
    (tmp_path / "2").mkdir()
    events = record_syncs(monkeypatch)
    atomic.point_symlink(tmp_path / "current", "2")
    assert events == [("rename", "current"), synced(tmp_path)]


def test_a_failed_symlink_switch_changes_nothing(tmp_path):
    (tmp_path / "current").mkdir()  # a real folder where the link should be: rename(2) refuses
    with pytest.raises(OSError):
        atomic.point_symlink(tmp_path / "current", "2")
    assert (tmp_path / "current").is_dir() and [p.name for p in tmp_path.iterdir()] == ["current"]


def test_a_switch_killed_before_the_rename_keeps_the_old_link(tmp_path):
    (tmp_path / "current").symlink_to("1")
    done = kill_before_rename(f"atomic.point_symlink({str(tmp_path / 'current')!r}, '2')")
    assert done.returncode == 9, done.stderr
    assert os.readlink(tmp_path / "current") == "1"
    assert [os.readlink(p) for p in atomic.leftovers(tmp_path / "current")] == ["2"]


def test_sync_tree_flushes_every_file_and_folder_and_follows_no_link(tmp_path, monkeypatch):
    staged = tmp_path / "staged"
    (staged / "checks").mkdir(parents=True)
    (staged / "model.pt").write_bytes(b"m")
    (staged / "checks" / "00.jpg").write_bytes(b"j")
    (staged / "elsewhere").symlink_to(tmp_path)
    (tmp_path / "outside.txt").write_text("not part of the tree")
    events = record_syncs(monkeypatch)
    atomic.sync_tree(staged)
    expected = [synced(p) for p in (staged / "model.pt", staged / "checks" / "00.jpg", staged / "checks", staged)]
    assert sorted(events) == sorted(expected)
    assert events[-1] == synced(staged), "the top folder is synced after what it holds"


def write_manifest(folder: Path) -> None:
    from serve.manifest import Manifest

    Manifest({"format_version": 2, "files": {}, "input": {}, "preprocessing": {}, "num_classes": 2}).write(folder)


def add_class_names(folder: Path) -> None:
    from export import classnames

    classnames.add_to_version(folder)


def write_history(folder: Path) -> None:
    from deploy.layout import Prefix

    Prefix(folder).write_history(["20261126T000000Z-abcdef0"])


def write_pid_file(folder: Path) -> None:
    from serve.server import write_pid_file

    write_pid_file(folder / "serve.pid")


@pytest.mark.parametrize("writer, name", [(write_manifest, "manifest.json"), (add_class_names, "manifest.json"),
                                          (write_history, "history"), (write_pid_file, "serve.pid")],
                         ids=["Manifest.write", "classnames", "deploy history", "pid file"])
def test_every_writer_of_a_shared_file_replaces_it_whole(tmp_path, monkeypatch, writer, name):
    old = json.dumps({"files": {"labels": {"file": "labels.txt"}}}) if name == "manifest.json" else "old\n"
    (tmp_path / name).write_text(old)
    (tmp_path / "labels.txt").write_text("AM General Hummer SUV 2000\n")

    def cut_short(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", cut_short)
    with pytest.raises(OSError, match="Input/output"):
        writer(tmp_path)
    assert (tmp_path / name).read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name, "labels.txt"})
    monkeypatch.undo()
    writer(tmp_path)
    assert (tmp_path / name).read_text() != old


def test_ops_needs_nothing_but_the_standard_library():
    # The deploy tool imports it from the system's Python, outside every virtualenv.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ops.atomic, ops.store; "
            "print(sorted({m.split('.')[0] for m in sys.modules}"
            " - set(sys.stdlib_module_names) - {'ops', '__main__'}))")
    done = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
