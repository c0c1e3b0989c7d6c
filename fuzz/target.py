"""The property every upload must satisfy, and the seed images the fuzzers start from.

Any bytes at all must give either an RGB Pillow image (and from it a uint8 tensor of the model's
input size) or an `ImageRejected` subclass, which the app turns into a 4xx. Anything else
escaping is a bug that would be a 500.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from serve.model.errors import ImageRejected
from serve.model.preprocess import Preprocessor

SIZE = 32
# Small enough that every input runs in milliseconds, large enough for real photos' headers.
MAX_PIXELS = 1_000_000
# Every resize method and pad mode the manifest may ask for, plus a centred crop-or-pad.
STEP_SETS = [
    [{"op": "resize", "method": "squish", "height": SIZE, "width": SIZE, "resample": "bilinear",
      "pad_mode": "reflection"}],
    [{"op": "resize", "method": "crop", "height": SIZE, "width": SIZE, "resample": "bicubic", "pad_mode": "zeros"}],
    [{"op": "resize", "method": "pad", "height": SIZE, "width": SIZE, "resample": "lanczos",
      "pad_mode": "reflection"}],
    [{"op": "resize", "method": "pad", "height": SIZE, "width": SIZE, "resample": "nearest", "pad_mode": "border"}],
    [{"op": "crop_pad", "height": SIZE, "width": SIZE, "pad_mode": "zeros"}],
]
CARS = Path(__file__).resolve().parent.parent / "tests" / "data" / "cars"
# The server's own preprocessing for each step set: decoding every pixel, or JPEGs in draft mode.
IN_FULL = [Preprocessor(steps, MAX_PIXELS, draft_margin=None) for steps in STEP_SETS]
IN_DRAFT = [Preprocessor(steps, MAX_PIXELS, draft_margin=2) for steps in STEP_SETS]


def check(data: bytes, steps_choice: int | None = None) -> str:
    """Decode and preprocess `data`; return "rejected" or "scored", raise on anything else.

    `steps_choice` picks one of STEP_SETS (all of them when None), which keeps a fuzzing run fast;
    odd choices also decode JPEGs in draft mode (scaled inside the decoder), as the server may.
    """
    if steps_choice is None:
        chosen = IN_FULL
    else:
        chosen = [(IN_DRAFT if steps_choice % 2 else IN_FULL)[steps_choice % len(STEP_SETS)]]
    try:
        image = chosen[0].decode(data)
    except ImageRejected:
        return "rejected"
    assert isinstance(image, Image.Image) and image.mode == "RGB", image
    assert image.size[0] >= 1 and image.size[1] >= 1 and image.size[0] * image.size[1] <= MAX_PIXELS
    for preprocessor in chosen:
        try:
            pixels = preprocessor(data)
        except ImageRejected:
            continue
        assert tuple(pixels.shape) == (3, SIZE, SIZE) and str(pixels.dtype) == "torch.uint8", pixels.shape
    return "scored"


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def seed_inputs() -> dict[str, bytes]:
    """Small valid files of every accepted format and odd mode, made from two real photos."""
    photos = sorted(CARS.glob("*/*.jpg"))[:2]
    seeds: dict[str, bytes] = {}
    for n, path in enumerate(photos):
        image = Image.open(path).convert("RGB")
        image.thumbnail((48, 48))
        exif = Image.Exif()
        exif[0x0112] = 6
        second = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        seeds.update({
            f"{n}.jpg": _encode(image, "JPEG", quality=80),
            f"{n}-progressive.jpg": _encode(image, "JPEG", quality=80, progressive=True),
            f"{n}-exif6.jpg": _encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif),
            f"{n}-cmyk.jpg": _encode(image.convert("CMYK"), "JPEG"),
            f"{n}.png": _encode(image, "PNG"),
            f"{n}-palette.png": _encode(image.convert("P"), "PNG", transparency=0),
            f"{n}-la.png": _encode(image.convert("LA"), "PNG"),
            f"{n}-16bit.png": _encode(image.convert("I;16"), "PNG"),
            f"{n}.gif": _encode(image, "GIF", save_all=True, append_images=[second], duration=50),
            f"{n}.webp": _encode(image, "WEBP", save_all=True, append_images=[second], duration=50),
            f"{n}.bmp": _encode(image, "BMP"),
            f"{n}.tiff": _encode(image, "TIFF"),
        })
    seeds["strip.png"] = _encode(Image.new("RGB", (1, 2000), (10, 200, 30)), "PNG")
    return seeds
