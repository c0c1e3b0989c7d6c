"""The exporter's self-check: the traced module, fed by the server's own preprocessing,
must agree with `learn.predict` on real images before anything is written."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from serve.model.preprocess import Preprocessor

from .torchscript import probabilities_of

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TOLERANCE = 1e-3
MAX_PIXELS = 200_000_000


@dataclass
class ParityReport:
    images: int
    top1_agree: int
    max_abs_diff: float
    decode_identical: int
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.images > 0 and self.top1_agree == self.images and self.max_abs_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {"images": self.images, "top1_agree": self.top1_agree, "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "fastai_decode_identical": self.decode_identical,
                "passed": self.passed}


def pick_images(files: list[Path], count: int) -> list[Path]:
    """Up to `count` files spread evenly over a sorted list, so every class tends to appear."""
    files = sorted(f for f in files if f.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) <= count:
        return files
    step = len(files) / count
    return [files[int(i * step)] for i in range(count)]


def calibrated(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) from softmax(logits): log-probabilities differ from the logits by one
    constant per photo, which the softmax ignores."""
    return probabilities if temperature == 1.0 else torch.softmax(probabilities.log() / temperature, dim=-1)


def with_ensemble(learn, also: list, image, first: torch.Tensor) -> torch.Tensor:
    """fastai's answer of an ensemble: `first` (learn.predict's probabilities) combined with the
    other learners' on the batch `learn` makes of the image, as export/torchscript.py combines
    them (the normalised geometric mean)."""
    from fastai.vision.core import PILImage
    (batch,) = learn.dls.test_dl([PILImage.create(image)]).one_batch()
    scores = [first.log()]
    with torch.no_grad():
        for other in also:
            scores.append(torch.log_softmax(other.model.eval()(batch).float(), dim=-1)[0])
    return torch.softmax(torch.stack(scores).mean(dim=0), dim=-1)


def check(learn, module: torch.jit.ScriptModule, steps: list[dict], files: list[Path],
          temperature: float = 1.0, also: list = ()) -> ParityReport:
    """Feed each file to the module through the server's own Preprocessor (draft decoding of large
    JPEGs included) and to learn.predict as the image the server decoded, and compare (fastai's
    probabilities brought to the module's calibration temperature). With `also`, the learners
    of an ensemble after `learn`, fastai's answer is the ensemble's."""
    from fastai.vision.core import PILImage

    preprocessor = Preprocessor(steps, MAX_PIXELS)
    agree, max_diff, same_decode = 0, 0.0, 0
    for path in files:
        data = path.read_bytes()
        image, pixels = preprocessor.decode(data), preprocessor(data)
        with torch.no_grad():
            ours = probabilities_of(module(pixels.unsqueeze(0)))[0]
        with warnings.catch_warnings(), learn.no_bar():
            warnings.simplefilter("ignore")
            theirs = learn.predict(PILImage.create(image))[2].float()
            if also:
                theirs = with_ensemble(learn, also, image, theirs)
            theirs = calibrated(theirs, temperature)
        agree += int(ours.argmax()) == int(theirs.argmax())
        max_diff = max(max_diff, float((ours - theirs).abs().max()))
        same_decode += PILImage.create(path).tobytes() == image.tobytes()
    return ParityReport(images=len(files), top1_agree=agree, max_abs_diff=max_diff, decode_identical=same_decode)
