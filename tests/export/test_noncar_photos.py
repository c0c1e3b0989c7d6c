"""The non-car photographs the exporter measures rejection on are installed and decodable."""

import pytest

from export import noncar_photos
from serve.model.decode import decode


def test_every_listed_photo_is_installed_and_decodes_like_an_upload():
    photos = noncar_photos.noncar_photos()
    assert len(photos) == sum(len(names) for _, _, names in noncar_photos.SOURCES) == 18
    assert len({p.name for p in photos}) == len(photos)
    for path in photos:
        image = decode(path.read_bytes(), 10**8)
        assert image.mode == "RGB" and min(image.size) >= 128, path.name


def test_a_missing_package_or_file_is_named(monkeypatch):
    monkeypatch.setattr(noncar_photos, "SOURCES", (("skimage", "data", ("no-such-photo.png",)),))
    with pytest.raises(noncar_photos.MissingPhotos, match="no-such-photo.png"):
        noncar_photos.noncar_photos()
    monkeypatch.setattr(noncar_photos, "SOURCES", (("no_such_package_here", "data", ("a.png",)),))
    with pytest.raises(noncar_photos.MissingPhotos, match="no_such_package_here"):
        noncar_photos.noncar_photos()
