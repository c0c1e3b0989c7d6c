"""The benchmark's inputs, built at run time from the committed test photos.

Three uploads a person might send: a typical web photo (a ~400 px JPEG as it is on disk), a
12-megapixel phone JPEG and a PNG. The big JPEG is an upscaled real photo rather than noise,
so its JPEG statistics, and the model's answer, stay those of a car photo.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CARS = ROOT / "tests" / "data" / "cars"
# A 400x243 photo of the first class: the one the web-photo figures refer to.
DEFAULT_PHOTO = CARS / "GMC Savana Van 2012" / "047.jpg"
PHONE_SIZE = (4000, 3000)


@dataclass(frozen=True)
class Input:
    name: str
    data: bytes
    content_type: str
    size: tuple[int, int]
    label: str

    def describe(self) -> str:
        return f"{self.name}: {self.size[0]}x{self.size[1]}, {len(self.data) / 1024:.0f} KiB"


def car_photos() -> list[Path]:
    return sorted(CARS.glob("*/*.jpg"))


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def phone_jpeg(photo: Path, size: tuple[int, int] = PHONE_SIZE, quality: int = 90) -> bytes:
    """A real photo stretched to phone resolution. Squished, not cropped: a squish-resizing
    model then sees the same geometry as from the original."""
    with Image.open(photo) as image:
        big = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return encode(big, "JPEG", quality=quality)


def build(photo: Path = DEFAULT_PHOTO) -> dict[str, Input]:
    data = photo.read_bytes()
    with Image.open(photo) as image:
        size = image.size
        png = encode(image.convert("RGB"), "PNG")
    label = photo.parent.name
    return {
        "jpeg400": Input("jpeg400", data, "image/jpeg", size, label),
        "jpeg12mp": Input("jpeg12mp", phone_jpeg(photo), "image/jpeg", PHONE_SIZE, label),
        "png": Input("png", png, "image/png", size, label),
    }
