"""Reading a learner's validation-time pipeline and translating it for the server.

Every transform that runs at validation time must be either replayed exactly by
`serve.model.preprocess` or folded into the TorchScript module (scaling, normalisation). Anything
else is refused: a server that silently approximates its training pipeline loses accuracy
nobody notices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from PIL import Image

from learners.learner import LearnerError

RESAMPLE_NAMES = {
    Image.Resampling.NEAREST: "nearest", Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic",
    Image.Resampling.LANCZOS: "lanczos", Image.Resampling.BOX: "box", Image.Resampling.HAMMING: "hamming",
}


class UnsupportedTransform(LearnerError):
    pass


@dataclass
class Pipeline:
    steps: list[dict] = field(default_factory=list)  # Pillow steps for serve.model.preprocess
    div: float | None = None                         # IntToFloatTensor
    mean: list[float] | None = None                  # Normalize
    std: list[float] | None = None
    skipped: list[str] = field(default_factory=list)  # training-only transforms
    identity: list[str] = field(default_factory=list)  # run at validation but change nothing


def _name(t) -> str:
    return type(t).__name__


def _runs_at_validation(t) -> bool:
    # fastai runs a transform on the validation set unless its split_idx is 0 (training only).
    return getattr(t, "split_idx", None) != 0


def _resample(t, mode) -> str:
    try:
        return RESAMPLE_NAMES[Image.Resampling(mode)]
    except (ValueError, KeyError):
        raise UnsupportedTransform(f"{_name(t)} uses Pillow resample {mode!r}, which whatcar does not replay") from None


def _item_steps(t) -> list[dict]:
    from fastai.vision.augment import CropPad, RandomResizedCrop, Resize

    if type(t) not in (Resize, RandomResizedCrop, CropPad):
        raise UnsupportedTransform(
            f"item transform {_name(t)} runs at validation time and whatcar cannot replay it exactly; "
            "use Resize (crop, squish or pad), RandomResizedCrop or CropPad as item_tfms, or make it "
            "training-only (split_idx=0)")
    width, height = (int(v) for v in t.size)  # fastai keeps sizes as (width, height)
    if type(t) is Resize:
        return [{"op": "resize", "method": str(t.method), "height": height, "width": width,
                 "resample": _resample(t, t.mode), "pad_mode": str(t.pad_mode)}]
    if type(t) is RandomResizedCrop:
        # At validation fastai squishes the whole image to size plus a margin, then centre-crops.
        xtra = math.ceil(max(width, height) * t.val_xtra / 8) * 8
        return [{"op": "resize", "method": "squish", "height": height + xtra, "width": width + xtra,
                 "resample": _resample(t, t.mode), "pad_mode": "zeros"},
                {"op": "crop_pad", "height": height, "width": width, "pad_mode": "zeros"}]
    return [{"op": "crop_pad", "height": height, "width": width, "pad_mode": str(t.pad_mode)}]


def read_pipeline(dls) -> Pipeline:
    """Translate `dls.valid`'s transforms, or raise UnsupportedTransform naming the culprit."""
    from fastai.data.transforms import IntToFloatTensor, Normalize
    from fastai.vision.augment import AffineCoordTfm, RandomResizedCropGPU
    from fastai.vision.core import ToTensor

    pipe = Pipeline()
    valid = dls.valid
    before = [t for t in valid.before_batch.fs if _runs_at_validation(t)]
    if before:
        raise UnsupportedTransform(f"before_batch transforms {[_name(t) for t in before]} are not supported")
    for t in valid.after_item.fs:
        if not _runs_at_validation(t):
            pipe.skipped.append(_name(t))
        elif isinstance(t, ToTensor):
            continue
        else:
            pipe.steps.extend(_item_steps(t))
    for t in valid.after_batch.fs:
        if not _runs_at_validation(t):
            pipe.skipped.append(_name(t))
        elif isinstance(t, IntToFloatTensor):
            pipe.div = float(t.div)
        elif isinstance(t, Normalize):
            if pipe.div is None:
                raise UnsupportedTransform("Normalize runs before IntToFloatTensor; whatcar expects the reverse")
            pipe.mean = [float(v) for v in t.mean.flatten()]
            pipe.std = [float(v) for v in t.std.flatten()]
        elif isinstance(t, RandomResizedCropGPU):
            raise UnsupportedTransform(
                "RandomResizedCropGPU resizes batches with grid_sample at validation time, which Pillow cannot "
                "reproduce; use item_tfms=RandomResizedCrop(size) instead")
        elif isinstance(t, AffineCoordTfm):
            if t.size is not None:
                raise UnsupportedTransform(
                    f"{_name(t)} from aug_transforms(size={t.size}) resizes every validation batch with "
                    "grid_sample, which Pillow cannot reproduce exactly; resize in item_tfms=Resize(...) "
                    "and call aug_transforms() without size=")
            # With no size, validation batches get the identity warp: a same-size bilinear
            # grid_sample, exact up to float rounding. The parity check confirms it.
            pipe.identity.append(_name(t))
        else:
            raise UnsupportedTransform(
                f"batch transform {_name(t)} runs at validation time and whatcar cannot replay it; "
                "remove it or make it training-only (split_idx=0)")
    if not pipe.steps:
        raise UnsupportedTransform("no item transform resizes the images; add item_tfms=Resize(size) so every "
                                   "image reaches the model at one fixed size")
    if pipe.div is None:
        raise UnsupportedTransform("the pipeline has no IntToFloatTensor; whatcar expects fastai's ImageBlock pipeline")
    return pipe
