"""Where an uploaded image gets decoded: bytes in, one upright 8-bit RGB Pillow image out.

The same function feeds the exporter's parity check, so whatever it does to odd modes is
exactly what the model was verified against.
"""

from __future__ import annotations

import io
import struct
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EmptyBody, TooManyPixels, UndecodableImage, UnsupportedImageType

# Formats Pillow may try (phone JPEGs that Pillow reports as MPO come in through JPEG). Anything
# else (EPS, PSD, ICO, SVG, ...) is refused before a decoder runs, keeping rarely used parsers away.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# How the accepted formats begin (BMP's two-byte "BM" is too weak a sign to count). Data that
# starts like one of them but does not open is a damaged image, not a foreign file type.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}

# Errors Pillow's decoders raise on damaged data; none of them means a bug on our side.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, IndexError, TypeError, EOFError, KeyError, struct.error)


def sniff(data: bytes) -> str | None:
    """The accepted format `data` starts like, judging by its first bytes only."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image and check its size from the header, before decoding any pixels."""
    if not data:
        raise EmptyBody("the request body is empty; send the image bytes")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns or raises on the process-wide limit; ours is per call.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"image is too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        claimed = sniff(data)
        if claimed is not None:
            raise UndecodableImage(
                f"the data starts as a {claimed} image but its header is damaged or truncated") from None
        raise UnsupportedImageType("not an image whatcar can read; send JPEG, PNG, WebP, GIF, BMP or TIFF") from None
    except _DECODE_ERRORS as exc:
        raise UndecodableImage(f"cannot read the image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise UndecodableImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise TooManyPixels(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Bring any mode Pillow decodes to 8-bit RGB.

    Mostly Pillow's own `convert("RGB")`, which is also what fastai's loader does, so the model
    sees uploads the way it saw its training photos (alpha is dropped, not composited). 16-bit
    and 32-bit integer images are scaled down to 8 bits first, where `convert` would clip them.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    return image.convert("RGB")


def decode(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an upload to an upright RGB image, or raise an `ImageRejected` subclass.

    Animated images give their first frame. EXIF orientation is applied, so phone photos
    are scored upright. `draft_size` (width, height) lets the JPEG decoder scale down by
    1/2, 1/4 or 1/8 while staying at least that large.
    """
    image = open_image(data, max_pixels)
    try:
        if draft_size is not None and image.format in ("JPEG", "MPO"):
            image.draft("RGB", draft_size)
        image.seek(0)
        image.load()
        upright = ImageOps.exif_transpose(image)
        return to_rgb(upright if upright is not None else image)
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"image is too large to decode safely ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise UndecodableImage(f"image data is corrupt or truncated: {exc}") from None
    except MemoryError:
        raise TooManyPixels("image needs more memory to decode than the server allows") from None
