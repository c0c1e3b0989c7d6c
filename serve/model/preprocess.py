"""Where an upload becomes the model's input: `Preprocessor`, decoding plus the manifest's steps.

`Preprocessor` is the one place the bytes -> tensor chain is put together; the server, the
exporter's parity check, the benchmark, the fuzzer and the tests all call it, so all of them
see exactly the pixels the server scores.

Each step mirrors a fastai validation-time item transform to the pixel: the exporter writes
the steps, checks them against fastai on real photos, and the server replays them here.
Resizes use Pillow exactly as fastai does, so both give the same bytes for the same Pillow.

Steps (all sizes in pixels):
    {"op": "resize", "method": "squish"|"crop"|"pad", "height", "width", "resample", "pad_mode"}
        fastai `Resize(size, method, pad_mode, resamples)` at validation (centred crop or pad).
    {"op": "crop_pad", "height", "width", "pad_mode"}
        fastai `CropPad`: centred crop, or pad where the image is smaller.
"""

from __future__ import annotations

import ctypes

import torch
from PIL import Image

from .decode import decode
from .errors import TooManyPixels

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
PAD_MODES = ("zeros", "border", "reflection")
METHODS = ("squish", "crop", "pad")


class SpecError(ValueError):
    """A preprocessing spec this server cannot replay."""


def _mirror_index(n: int, start: int, count: int, pad_mode: str) -> torch.Tensor:
    """Source index for each of `count` positions from `start` along an axis of length n.

    Border repeats the edge pixel; reflection mirrors without repeating it, over and over for
    pads wider than the image, as numpy's `pad(mode="reflect")` (behind torchvision's pad) does.
    """
    idx = torch.arange(start, start + count)
    if pad_mode == "border" or n == 1:
        return idx.clamp(0, n - 1)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx < n, idx, period - idx)


def _pad(image: Image.Image, left: int, top: int, right: int, bottom: int, pad_mode: str) -> Image.Image:
    width, height = image.size
    if pad_mode == "zeros":
        canvas = Image.new("RGB", (width + left + right, height + top + bottom))
        canvas.paste(image, (left, top))
        return canvas
    pixels = image_to_tensor(image)  # [3, H, W]
    rows = _mirror_index(height, -top, height + top + bottom, pad_mode)
    cols = _mirror_index(width, -left, width + left + right, pad_mode)
    padded = pixels.index_select(1, rows).index_select(2, cols).permute(1, 2, 0).contiguous()
    # numpy is not a serving dependency, so the bytes are read straight from the tensor's memory.
    raw = ctypes.string_at(padded.data_ptr(), padded.numel())
    return Image.frombytes("RGB", (padded.shape[1], padded.shape[0]), raw)


def crop_pad(image: Image.Image, size: tuple[int, int], top_left: tuple[int, int], pad_mode: str,
             resample: str | None = None, resize_to: tuple[int, int] | None = None) -> Image.Image:
    """fastai's `crop_pad` for Pillow images; sizes and corners are (width, height)."""
    (ow, oh), (sw, sh), (tx, ty) = image.size, size, top_left
    if tx >= 0 or ty >= 0 or tx + sw <= ow or ty + sh <= oh:
        image = image.crop((max(tx, 0), max(ty, 0), min(tx + sw, ow), min(ty + sh, oh)))
    if tx < 0 or ty < 0 or tx + sw >= ow or ty + sh >= oh:
        left, top = max(-tx, 0), max(-ty, 0)
        right, bottom = max(sw - ow + tx, 0), max(sh - oh + ty, 0)
        if left or top or right or bottom:
            image = _pad(image, left, top, right, bottom, pad_mode)
    if resize_to is not None:
        image = image.resize(resize_to, RESAMPLE[resample])
    return image


def resize(image: Image.Image, step: dict, max_pixels: int | None = None) -> Image.Image:
    width, height = image.size
    target = (step["width"], step["height"])
    if step["method"] == "squish":
        return crop_pad(image, (width, height), (0, 0), step["pad_mode"], step["resample"], target)
    # Crop keeps the larger scale factor's side whole and cuts the other; pad does the opposite.
    ratio_w, ratio_h = width / target[0], height / target[1]
    if step["method"] == "crop":
        scale = ratio_w if ratio_w < ratio_h else ratio_h
    else:
        scale = ratio_w if ratio_w > ratio_h else ratio_h
    size = (int(scale * target[0]), int(scale * target[1]))
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        # Padding keeps the long side, so a 1x20000 strip would become a 20000x20000 canvas first.
        raise TooManyPixels(f"padding the {width}x{height} image to the model's shape needs {size[0]}x{size[1]} "
                            f"pixels; the limit is {max_pixels}")
    top_left = (int(0.5 * (width - size[0])), int(0.5 * (height - size[1])))
    return crop_pad(image, size, top_left, step["pad_mode"], step["resample"], target)


def center_crop_pad(image: Image.Image, step: dict) -> Image.Image:
    size = (step["width"], step["height"])
    top_left = ((image.size[0] - size[0]) // 2, (image.size[1] - size[1]) // 2)
    return crop_pad(image, size, top_left, step["pad_mode"])


OPS = {"resize": resize, "crop_pad": center_crop_pad}


def validate_steps(steps: list[dict]) -> tuple[int, int]:
    """Check every step can be replayed; return the (height, width) the last one produces."""
    if not steps:
        raise SpecError("the preprocessing has no steps; at least one resize is needed for a fixed input size")
    for i, step in enumerate(steps):
        op = step.get("op")
        if op not in OPS:
            raise SpecError(f"step {i}: unknown op {op!r}; this server knows {sorted(OPS)}")
        for key in ("height", "width"):
            if not isinstance(step.get(key), int) or step[key] < 1:
                raise SpecError(f"step {i} ({op}): {key} must be a positive integer")
        if step.get("pad_mode") not in PAD_MODES:
            raise SpecError(f"step {i} ({op}): pad_mode must be one of {PAD_MODES}")
        if op == "resize":
            if step.get("method") not in METHODS:
                raise SpecError(f"step {i} (resize): method must be one of {METHODS}")
            if step.get("resample") not in RESAMPLE:
                raise SpecError(f"step {i} (resize): resample must be one of {sorted(RESAMPLE)}")
    return steps[-1]["height"], steps[-1]["width"]


# How much larger than the first resize's output a JPEG must stay when decoded in draft mode.
# Draft mode has the JPEG decoder scale by 1/2, 1/4 or 1/8 inside the DCT, much faster than
# decoding every pixel of a phone photo and resizing it; the pixels differ slightly from a full
# decode followed by the same resize, less the more margin is kept (docs/benchmark.md has the
# measured effect on the model's answers).
DRAFT_MARGIN = 2


def draft_size(steps: list[dict], margin: int = DRAFT_MARGIN) -> tuple[int, int] | None:
    """The smallest (width, height) a JPEG may be decoded at for these steps, or None for a full
    decode. Only a leading resize allows it: crops and pads work on exact pixels. The size is a
    square so that it also holds after EXIF orientation swaps width and height."""
    if not steps or steps[0]["op"] != "resize":
        return None
    side = margin * max(steps[0]["height"], steps[0]["width"])
    return side, side


def apply_steps(image: Image.Image, steps: list[dict], max_pixels: int | None = None) -> Image.Image:
    """Run the steps; `max_pixels` bounds the canvas a padding resize may build on the way."""
    for step in steps:
        image = resize(image, step, max_pixels) if step["op"] == "resize" else OPS[step["op"]](image, step)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB Pillow image to a uint8 [3, H, W] tensor (a channels-last view of one copy)."""
    width, height = image.size
    buffer = bytearray(image.tobytes())
    return torch.frombuffer(buffer, dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


class Preprocessor:
    """Image bytes to the model's uint8 [3, H, W] input, as the server scores them.

    `max_pixels` bounds both the decoded image and any canvas a padding step builds. Large
    JPEGs are decoded in draft mode (see DRAFT_MARGIN); `draft_margin=None` decodes every pixel.
    Raises an `ImageRejected` subclass for anything that cannot be scored.
    """

    def __init__(self, steps: list[dict], max_pixels: int, draft_margin: int | None = DRAFT_MARGIN):
        self.height, self.width = validate_steps(steps)
        self.steps = steps
        self.max_pixels = max_pixels
        self.draft_size = draft_size(steps, draft_margin) if draft_margin else None

    def decode(self, data: bytes) -> Image.Image:
        """The upright RGB image the steps start from."""
        return decode(data, self.max_pixels, draft_size=self.draft_size)

    def __call__(self, data: bytes) -> torch.Tensor:
        return image_to_tensor(apply_steps(self.decode(data), self.steps, self.max_pixels))
