"""ops/store.py: version folders side by side and the links that name them, as both the model
folder and the deploy prefix use them."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import pytest

from ops import atomic
from ops.store import Store, prunable
from tests.support.syncs import record_syncs, synced

NUMBER = re.compile(r"^[0-9]{1,9}$")
RELEASE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{7}$")
A, B, C = (f"2026112{n}T000000Z-abcdef{n}" for n in range(3))


def numbered(root: Path, *versions: str) -> Store:
    for version in versions:
        (root / version).mkdir(parents=True)
    return Store(root, names=NUMBER, numbered=True)


def staged(parent: Path, name: str = ".new") -> Path:
    (parent / name / "checks").mkdir(parents=True)
    (parent / name / "manifest.json").write_text("{}")
    (parent / name / "checks" / "00.jpg").write_bytes(b"jpeg")
    return parent / name


@pytest.mark.parametrize("versions, keep, protected, removed", [
    (["1", "2", "3", "4", "5"], 2, set(), ["1", "2", "3"]),
    (["1", "2", "3", "4", "5"], 2, {"1", "4"}, ["2", "3"]),  # an old previous survives
    (["1", "2"], 5, set(), []),
    (["1", "2", "3"], 0, set(), []),  # zero keeps everything, it does not remove everything
    ([], 3, {None}, []),
])
def test_prunable_keeps_the_newest_and_what_is_protected(versions, keep, protected, removed):
    assert prunable(versions, keep, protected) == removed


def test_prunable_never_removes_a_protected_version_or_one_of_the_newest():
    chance = random.Random(7)
    for _ in range(500):
        versions = [str(n) for n in range(chance.randint(0, 12))]
        keep = chance.randint(1, 6)
        protected = set(chance.sample(versions, min(len(versions), chance.randint(0, 2))))
        removed = prunable(versions, keep, protected)
        assert not set(removed) & protected
        assert not set(removed) & set(versions[-keep:])
        assert set(versions) - set(removed) == set(versions[-keep:]) | protected
        assert removed == sorted(removed, key=int), "oldest first"


def test_versions_are_matching_folders_in_order(tmp_path):
    store = numbered(tmp_path, "2", "10", "1")
    (tmp_path / "notes").mkdir()
    (tmp_path / "3").write_text("a file, not a version")
    (tmp_path / "4").symlink_to("10")
    assert store.versions() == ["1", "2", "10"]
    assert Store(tmp_path / "missing", names=NUMBER).versions() == []


def test_with_a_marker_only_finished_folders_are_versions(tmp_path):
    store = Store(tmp_path, tmp_path / "releases", names=RELEASE, marker="release.json")
    for name in (B, A, C):
        (tmp_path / "releases" / name).mkdir(parents=True)
    for name in (A, B):
        (tmp_path / "releases" / name / "release.json").write_text("{}")
    assert store.versions() == [A, B] and not store.is_version(C)


def test_links_are_written_relative_to_their_folder_and_read_back(tmp_path):
    store = numbered(tmp_path, "1", "2")
    store.point("current", "2")
    assert os.readlink(tmp_path / "current") == "2" and store.linked("current") == "2"
    releases = Store(tmp_path, tmp_path / "releases", names=RELEASE)
    releases.point("current", A)
    assert os.readlink(tmp_path / "current") == f"releases/{A}" and releases.linked("current") == A
    assert releases.linked("missing") is None


@pytest.mark.parametrize("target", ["/etc", "../1", "1/../1", "other/1", "one", "1/"])
def test_a_link_elsewhere_names_no_version(tmp_path, target):
    store = numbered(tmp_path, "1")
    (tmp_path / "current").symlink_to(target)
    assert store.linked("current") is None


def test_an_absolute_link_names_a_version_only_where_allowed(tmp_path):
    strict = Store(tmp_path, tmp_path / "releases", names=RELEASE)
    lenient = Store(tmp_path, tmp_path / "releases", names=RELEASE, absolute_links=True)
    (tmp_path / "current").symlink_to(tmp_path / "releases" / A)
    assert strict.linked("current") is None and lenient.linked("current") == A


def test_add_syncs_the_folder_then_renames_it_in_then_syncs_the_rename(tmp_path, monkeypatch):
    store = numbered(tmp_path / "models", "1")
    staging = staged(tmp_path / "models")
    files = [synced(p) for p in (staging, staging / "manifest.json", staging / "checks", staging / "checks" / "00.jpg")]
    events = record_syncs(monkeypatch, rename="rename")
    assert store.add(staging) == "2"
    renamed = events.index(("rename", "2"))
    assert sorted(events[:renamed]) == sorted(files), "everything staged is on disk before the rename"
    assert events[renamed + 1:] == [synced(tmp_path / "models")]
    assert store.versions() == ["1", "2"] and (tmp_path / "models" / "2" / "checks" / "00.jpg").is_file()


def test_add_takes_the_next_free_number_when_another_writer_took_it(tmp_path, monkeypatch):
    store = numbered(tmp_path, "1")
    staging = staged(tmp_path)
    real_rename = os.rename

    def raced(src, dst):
        if Path(dst).name == "2" and not (tmp_path / "2").exists():
            shutil.copytree(staged(tmp_path, ".other"), tmp_path / "2")  # another export, a moment sooner
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", raced)
    assert store.add(staging) == "3"
    assert store.versions() == ["1", "2", "3"]


def test_add_under_a_taken_name_fails_and_leaves_both(tmp_path):
    store = Store(tmp_path, tmp_path / "releases", names=RELEASE, marker="release.json")
    (tmp_path / "releases" / A).mkdir(parents=True)
    (tmp_path / "releases" / A / "release.json").write_text("{}")
    staging = staged(tmp_path / "releases", f".build-{A}")
    with pytest.raises(OSError):
        store.add(staging, A)
    assert staging.is_dir() and store.versions() == [A]
    with pytest.raises(ValueError, match="numbered"):
        store.add(staging)


def test_a_removal_cut_short_leaves_a_leftover_never_a_half_version(tmp_path, monkeypatch):
    store = numbered(tmp_path, "1", "2")
    (tmp_path / "1" / "model.pt").write_bytes(b"m")

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.remove("1")
    assert store.versions() == ["2"]
    assert [p.name for p in store.leftovers()] == [".remove-1"]


def test_prune_never_removes_current_or_previous(tmp_path):
    store = numbered(tmp_path, *[str(n) for n in range(1, 9)])
    store.point("current", "2")
    store.point("previous", "1")
    removed = store.prune(3, {store.linked("current"), store.linked("previous")})
    assert removed == ["3", "4", "5"]
    assert store.versions() == ["1", "2", "6", "7", "8"]
    assert (tmp_path / "current").resolve() == tmp_path / "2" and (tmp_path / "previous").resolve() == tmp_path / "1"
    assert store.leftovers("current", "previous") == []


def test_leftovers_include_a_link_switch_that_died_before_its_rename(tmp_path):
    store = numbered(tmp_path, "1", "2")
    store.point("current", "1")
    os.symlink("2", atomic.temporary_name(tmp_path / "current"))  # what a killed switch leaves
    assert [os.readlink(p) for p in store.leftovers("current")] == ["2"]
    assert store.linked("current") == "1"
