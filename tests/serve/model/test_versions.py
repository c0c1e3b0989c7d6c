"""The model folder on disk: versions side by side, current and previous, and names that cannot
leave the folder."""

import os

import pytest

from serve.model.versions import VersionError, VersionFolder
from tests.support.paths import ARTIFACTS
from tests.support.syncs import record_syncs, synced


def folder_with(tmp_path, *versions: str, current: str | None = None):
    for version in versions:
        (tmp_path / version).mkdir()
        (tmp_path / version / "manifest.json").write_text("{}")
    if current is not None:
        os.symlink(current, tmp_path / "current")
    return VersionFolder(tmp_path)


def staged(tmp_path, name: str = ".staging"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "manifest.json").write_text("{}")
    return tmp_path / name


def test_the_committed_folder_serves_version_1():
    models = VersionFolder(ARTIFACTS)
    assert models.current() == "1" and "1" in models.versions()
    assert models.folder("1") == ARTIFACTS / "1" and (models.folder("1") / "manifest.json").is_file()


def test_versions_are_numbered_folders_in_numeric_order(tmp_path):
    models = folder_with(tmp_path, "2", "10", "1", current="10")
    (tmp_path / "notes").mkdir()
    (tmp_path / ".new-abc").mkdir()
    assert models.versions() == ["1", "2", "10"]
    assert models.current() == "10"


def test_a_single_artifact_folder_is_version_1(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    models = VersionFolder(tmp_path)
    assert models.flat and models.versions() == ["1"] and models.current() == "1"
    assert models.folder("1") == tmp_path
    with pytest.raises(VersionError, match="single artifact"):
        models.add(staged(tmp_path.parent, "other"))


@pytest.mark.parametrize("name", ["../1", "1/../1", "/etc", "one", "", " 1", "1 ", "-1", "1.0", None, 1])
def test_only_names_of_version_folders_are_accepted(tmp_path, name):
    models = folder_with(tmp_path, "1", current="1")
    with pytest.raises(VersionError):
        models.folder(name)


def test_a_number_that_is_not_there_is_refused(tmp_path):
    models = folder_with(tmp_path, "1", current="1")
    with pytest.raises(VersionError, match="has no version 7"):
        models.check("7")


def test_current_must_link_to_a_version_beside_it(tmp_path):
    models = folder_with(tmp_path, "1")
    with pytest.raises(VersionError, match="no current version"):
        models.current()
    os.symlink("/etc", tmp_path / "current")
    with pytest.raises(VersionError, match="must be a symlink to a version folder"):
        models.current()
    (tmp_path / "current").unlink()
    (tmp_path / "current").write_text("1")
    with pytest.raises(VersionError, match="must be a symlink"):
        models.current()


def test_add_takes_the_next_number_and_switch_remembers_the_previous(tmp_path):
    models = folder_with(tmp_path, "1", "2", current="2")
    version = models.add(staged(tmp_path))
    assert version == "3" and not (tmp_path / ".staging").exists()
    assert models.current() == "2"
    models.switch_to(version)
    assert (models.current(), models.previous()) == ("3", "2")
    assert os.readlink(tmp_path / "current") == "3"


def test_the_first_version_of_an_empty_folder_is_1(tmp_path):
    models = VersionFolder(tmp_path / "models")
    version = models.add(staged(tmp_path))
    models.switch_to(version)
    assert version == "1" and models.current() == "1" and models.previous() is None


def test_rollback_swaps_current_and_previous(tmp_path):
    models = folder_with(tmp_path, "1", "2", current="1")
    with pytest.raises(VersionError, match="no previous version"):
        models.rollback()
    models.switch_to("2")
    assert models.rollback() == ("1", "2")
    assert (models.current(), models.previous()) == ("1", "2")
    assert models.rollback() == ("2", "1")


def test_prune_keeps_the_newest_and_never_current_or_previous(tmp_path):
    models = folder_with(tmp_path, *[str(v) for v in range(1, 9)], current="2")
    os.symlink("1", tmp_path / "previous")
    assert models.prune(keep=3) == ["3", "4", "5"]
    assert models.versions() == ["1", "2", "6", "7", "8"]
    assert models.prune(keep=3) == []


def test_a_switch_is_on_disk_when_it_returns(tmp_path, monkeypatch):
    # As a deploy's is: after a power cut, current names the version it was switched to.
    models = folder_with(tmp_path, "1", "2", current="1")
    events = record_syncs(monkeypatch)
    models.switch_to("2")
    assert events == [("rename", "previous"), synced(tmp_path), ("rename", "current"), synced(tmp_path)]
