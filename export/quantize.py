"""int8 through PyTorch 2 export quantisation (PT2E): `python -m export --quantize int8`.

torchao's X86InductorQuantizer marks the exported graph for oneDNN's int8 kernels: weights
int8 per output channel (symmetric), activations uint8 per tensor, with scales fixed by
calibration (static). Calibration runs real training photos through the server's own
Preprocessor, so the activation ranges are those the server will see. The quantised program
is then compiled like the float one (export/compiled.py); the package it makes calls only
torch's own quantised convolution and linear operators, so the server needs no torchao.

An int8 model answers differently from the float one, so it is judged on accuracy, not on
probability parity: validation top-1 of the int8 package against the float module's on the
same photos, through the same Preprocessor, at most `MAX_DROP` lower or it is refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from serve.model.preprocess import Preprocessor

from .compiled import MAX_BATCH, export_program
from .parity import IMAGE_SUFFIXES, MAX_PIXELS, pick_images

CALIBRATION_IMAGES = 128
CALIBRATION_BATCH = 8
MAX_DROP = 0.01  # one percentage point of top-1


@dataclass
class Accuracy:
    correct: int
    images: int

    @property
    def top1(self) -> float:
        return self.correct / self.images if self.images else 0.0

    def __str__(self) -> str:
        return f"{100 * self.top1:.1f} % ({self.correct}/{self.images})"


def acceptable(float32: Accuracy, int8: Accuracy, max_drop: float = MAX_DROP) -> bool:
    """Whether the int8 model keeps the float one's validation top-1 within `max_drop`."""
    return int8.images == float32.images > 0 and float32.top1 - int8.top1 <= max_drop + 1e-12


def training_files(info: dict) -> list[Path]:
    """The photos the learner was trained on: its data folder without its validation files."""
    data = Path(info.get("data", ""))
    if not info.get("data") or not data.is_dir():
        return []
    valid = {(data / rel).resolve() for rel in info.get("valid_files", [])}
    return sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and p.resolve() not in valid)


def validation_files(info: dict) -> list[Path]:
    data = Path(info.get("data", ""))
    return [data / rel for rel in info.get("valid_files", []) if (data / rel).is_file()] if info.get("data") else []


def float_module_names(model: torch.nn.Module, keep: list[str]) -> list[str]:
    """The module names (as torch.export records them) that `keep` asks to leave in float32:
    "stem" is the first convolution, "head" fastai's classifier head (the model's last child)."""
    names = []
    if "stem" in keep:
        first = next((name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)), None)
        if first is not None:
            names.append(first)
    if "head" in keep:
        children = [name for name, _ in model.named_children()]
        if len(children) > 1:
            names.append(children[-1])
    return names


def int8_program(served: torch.nn.Module, steps: list[dict], calibration: list[Path], height: int, width: int,
                 keep_float: list[str] = (), max_batch: int = MAX_BATCH):
    """The served module quantised to int8 and exported again with a dynamic batch, ready for
    export/compiled.compile_package(..., quantized=True)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not calibration:
        raise ValueError("no training photos to calibrate int8 activations with")
    graph = export_program(served, height, width, max_batch).module()
    quantizer = xiq.X86InductorQuantizer()
    # Static, per-channel symmetric int8 weights and per-tensor uint8 activations.
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    for name in float_module_names(served, list(keep_float)):
        quantizer.set_module_name_qconfig(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(graph, quantizer)
        preprocessor = Preprocessor(steps, MAX_PIXELS)
        with torch.no_grad():
            for start in range(0, len(calibration), CALIBRATION_BATCH):
                batch = calibration[start:start + CALIBRATION_BATCH]
                prepared(torch.stack([preprocessor(path.read_bytes()) for path in batch]))
        converted = convert_pt2e(prepared)
    return export_program(converted, height, width, max_batch)


def accuracy(runner, steps: list[dict], files: list[Path], vocab: list[str]) -> Accuracy:
    """Top-1 of `runner` on photos labelled by their folder's name, through the server's Preprocessor."""
    preprocessor = Preprocessor(steps, MAX_PIXELS)
    index = {label: i for i, label in enumerate(vocab)}
    correct = images = 0
    with torch.no_grad():
        for path in files:
            if path.parent.name not in index:
                continue
            scores = runner(preprocessor(path.read_bytes()).unsqueeze(0))[0][:len(vocab)]
            correct += int(scores.argmax()) == index[path.parent.name]
            images += 1
    return Accuracy(correct, images)


def calibration_files(info: dict, count: int = CALIBRATION_IMAGES) -> list[Path]:
    return pick_images(training_files(info), count)
