"""JPEG draft decoding: phone photos are decoded at a fraction of their size, web photos as they are."""

import io

import pytest
import torch
from PIL import Image

from serve.model.decode import decode
from serve.model.preprocess import DRAFT_MARGIN, Preprocessor, draft_size
from tests.support.paths import car_photos

STEPS = [{"op": "resize", "method": "squish", "height": 288, "width": 288, "resample": "bilinear",
          "pad_mode": "reflection"}]
BIG = 200_000_000


def jpeg(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **params)
    return buffer.getvalue()


def phone_photo(path, size=(4000, 3000), **params) -> bytes:
    with Image.open(path) as image:
        return jpeg(image.convert("RGB").resize(size, Image.Resampling.BICUBIC), **params)


def test_draft_size_follows_the_first_resize():
    assert draft_size(STEPS) == (DRAFT_MARGIN * 288, DRAFT_MARGIN * 288)
    wide = [{**STEPS[0], "height": 224, "width": 320}]
    assert draft_size(wide) == (DRAFT_MARGIN * 320,) * 2
    crop_first = [{"op": "crop_pad", "height": 288, "width": 288, "pad_mode": "zeros"}, *STEPS]
    assert draft_size(crop_first) is None


@pytest.mark.parametrize("path", car_photos()[::4], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_web_photos_decode_to_the_same_pixels(path):
    data = path.read_bytes()
    full, drafted = decode(data, BIG), decode(data, BIG, draft_size=draft_size(STEPS))
    assert drafted.size == full.size and drafted.tobytes() == full.tobytes()


def test_phone_photo_is_decoded_smaller_but_never_below_the_margin():
    data = phone_photo(car_photos()[0])
    image = decode(data, BIG, draft_size=draft_size(STEPS))
    # 4000x3000 at 1/4; 1/8 (500x375) would fall below twice the 288 px input.
    assert image.size == (1000, 750)


def test_rotated_phone_photo_is_drafted_then_turned_upright():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    data = phone_photo(car_photos()[0], size=(4000, 3000), exif=exif.tobytes())
    full, drafted = decode(data, BIG), decode(data, BIG, draft_size=draft_size(STEPS))
    assert full.size == (3000, 4000)
    assert drafted.size == (750, 1000)


def test_drafted_phone_photos_score_like_full_decodes(handler):
    """The model's answer on a drafted 12 MP photo against the same photo decoded in full."""
    steps = handler.artifact.steps
    module = handler.artifact.runner  # what serves, whichever runtime it is
    in_full, in_draft = Preprocessor(steps, BIG, draft_margin=None), Preprocessor(steps, BIG)
    worst = 0.0
    for path in car_photos()[::8]:
        data = phone_photo(path)
        full, drafted = in_full(data), in_draft(data)
        assert in_draft.decode(data).size[0] < in_full.decode(data).size[0]
        assert drafted.shape == full.shape
        with torch.inference_mode():
            p_full, p_draft = module(torch.stack([full, drafted]))
        assert int(p_full.argmax()) == int(p_draft.argmax()), path
        worst = max(worst, float((p_full - p_draft).abs().max()))
    assert worst < 0.05
