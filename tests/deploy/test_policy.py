"""The deploy tool's decisions and its on-disk primitives, without building anything."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime

import pytest

from deploy.envfile import EnvFileError, parse_env_file
from deploy.layout import Prefix
from deploy.policy import new_release_id, previous_release, releases_to_remove, rollback_stack, venv_key

A, B, C, D = (f"2026112{n}T000000Z-abcdef{n}" for n in range(4))


def test_release_ids_sort_by_time_and_never_collide():
    now = datetime(2026, 11, 26, 9, 30, 15, tzinfo=UTC)
    first = new_release_id(now, "0ef210e0123", set())
    assert first == "20261126T093015Z-0ef210e"
    assert new_release_id(now, "0ef210e0123", {first}) == first + "-2"
    assert new_release_id(now, "0ef210e0123", {first, first + "-2"}) == first + "-3"
    later = new_release_id(datetime(2026, 11, 26, 9, 30, 16, tzinfo=UTC), "00000001", set())
    assert sorted([later, first]) == [first, later]


@pytest.mark.parametrize("history, current, complete, expected", [
    ([], None, set(), []),
    ([], A, {A}, [A]),  # deployed before there was a history
    ([A, B], B, {A, B}, [A, B]),
    ([A, B, C], B, {A, B, C}, [A, B]),  # a rollback switched current, then died before writing history
    ([A, B], C, {A, B, C}, [A, B, C]),  # a deploy switched current, then died before writing history
    ([A, B, C], C, {B, C}, [B, C]),  # A was removed
], ids=["nothing", "no-history", "agree", "rollback-interrupted", "deploy-interrupted", "removed"])
def test_rollback_stack_follows_the_current_symlink(history, current, complete, expected):
    assert rollback_stack(history, current, complete) == expected


def test_rollback_returns_to_what_was_current_before_not_to_what_was_built_before():
    # A, then B deployed and found bad: rolled back to A. C deployed. Rolling back from C must
    # return to A, which served before C, and never to B.
    history = [A, B]
    history = rollback_stack(history, A, {A, B})  # after the rollback
    history = rollback_stack(history, A, {A, B, C}) + [C]  # the deploy of C
    assert previous_release(history) == A
    assert previous_release(rollback_stack(history[:-1], A, {A, B, C})) is None


@pytest.mark.parametrize("complete, stack, keep, removed", [
    ([A, B, C, D], [A, B, C, D], 3, [A]),
    ([A, B, C, D], [A, B, C, D], 2, [A, B]),
    ([A, B, C, D], [A, D], 2, [B]),  # D's previous is A: kept although older than the newest two
    ([A, B, C, D], [B], 2, [A]),  # rolled back to B: C and D are the newest
    ([A], [A], 2, []),
])
def test_pruning_keeps_the_newest_and_never_current_or_previous(complete, stack, keep, removed):
    assert releases_to_remove(complete, stack, keep) == removed
    assert not set(removed) & set(stack[-2:])


def test_pruning_refuses_to_keep_fewer_than_current_and_previous():
    with pytest.raises(ValueError):
        releases_to_remove([A, B], [A, B], 1)


def test_venv_key_changes_with_each_input():
    base = ("/usr/bin/python3", "3.11.2", b"torch==2.13.0\n", [])
    keys = {venv_key(*base),
            venv_key("/usr/local/bin/python3", *base[1:]),
            venv_key(base[0], "3.11.9", *base[2:]),
            venv_key(*base[:2], b"torch==2.13.1\n", []),
            venv_key(*base[:3], ["--extra-index-url", "https://download.pytorch.org/whl/cpu"])}
    assert len(keys) == 5
    assert venv_key(*base) == venv_key(*base)


def test_env_file_reads_what_systemd_reads():
    text = ("# comment\n; another\n\nWHATCAR_MODEL_DIR=/srv/model\n  WHATCAR_THREADS = 8  \n"
            "WHATCAR_LOG_LEVEL=\"DEBUG\"\nQUOTED='a b'\nno separator line\nEMPTY=\n")
    assert parse_env_file(text) == {"WHATCAR_MODEL_DIR": "/srv/model", "WHATCAR_THREADS": "8",
                                    "WHATCAR_LOG_LEVEL": "DEBUG", "QUOTED": "a b", "EMPTY": ""}


@pytest.mark.parametrize("line", ["A=one\\\n", "A=\"x\\\"y\"", "A='open", "1A=x", "A=\"$HOME\""])
def test_env_file_refuses_what_it_might_read_differently(line):
    with pytest.raises(EnvFileError, match="line 1"):
        parse_env_file(line)


def test_switch_replaces_current_atomically(tmp_path):
    prefix = Prefix(tmp_path)
    prefix.releases.mkdir()
    for name in (A, B):
        (prefix.releases / name).mkdir()
        (prefix.releases / name / "release.json").write_text("{}")
    prefix.switch(A)
    assert prefix.current_release() == A and os.readlink(prefix.current) == f"releases/{A}"
    missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not prefix.current.is_symlink():
                missing.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(300):
            prefix.switch(B)
            prefix.switch(A)
    finally:
        stop.set()
        watcher.join()
    assert missing == [], "current was missing while it was being switched"
    assert not list(tmp_path.glob(".current.*"))


def test_current_must_be_a_symlink_into_releases(tmp_path):
    prefix = Prefix(tmp_path)
    (tmp_path / "current").mkdir()
    with pytest.raises(ValueError, match="is not a symlink"):
        prefix.current_release()
    (tmp_path / "current").rmdir()
    (tmp_path / "current").symlink_to("/usr")
    with pytest.raises(ValueError, match="not at a release"):
        prefix.current_release()


def test_only_complete_releases_count_and_leftovers_are_found(tmp_path):
    prefix = Prefix(tmp_path)
    prefix.releases.mkdir()
    (prefix.releases / A).mkdir()
    (prefix.releases / A / "release.json").write_text("{}")
    (prefix.releases / B).mkdir()  # no release.json: never finished
    (prefix.releases / f".build-{C}").mkdir()
    (prefix.releases / C).symlink_to(f".build-{C}")  # the name a build is reached by
    (prefix.releases / f".remove-{D}").mkdir()
    (prefix.releases / "notes.txt").write_text("an operator's file")
    assert prefix.complete_releases() == [A]
    assert [p.name for p in prefix.leftovers()] == sorted([f".build-{C}", f".remove-{D}", C])
    for path in prefix.leftovers():
        prefix.remove(path)
    assert sorted(p.name for p in prefix.releases.iterdir()) == sorted([A, B, "notes.txt"])


def test_a_release_is_renamed_out_of_the_way_before_it_is_deleted(tmp_path, monkeypatch):
    prefix = Prefix(tmp_path)
    prefix.releases.mkdir()
    (prefix.releases / A / "sub").mkdir(parents=True)
    (prefix.releases / A / "release.json").write_text("{}")

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("shutil.rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prefix.remove(prefix.releases / A)
    assert prefix.complete_releases() == []
    assert [p.name for p in prefix.leftovers()] == [f".remove-{A}"]


def test_the_prefix_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    first, second = Prefix(tmp_path), Prefix(tmp_path)
    assert first.lock()
    assert not second.lock()
    os.close(first._lock_fd)
    assert second.lock()


def test_a_system_error_in_a_step_becomes_one_line_naming_the_step(capsys):
    import errno

    from deploy.errors import StepFailed
    from deploy.release import Run

    run = Run("deploy")
    with pytest.raises(StepFailed) as failed:
        with run.stage("venv", "building"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/prefix/releases/.build-x/.venv")
    assert (failed.value.step, failed.value.reason) == \
        ("venv", "no space left on device (/prefix/releases/.build-x/.venv)")
    assert capsys.readouterr().out == "deploy: venv: building\n"
