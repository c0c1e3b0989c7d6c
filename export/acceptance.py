"""Calibration and the "unknown" answer, measured at export on real photos.

- The temperature T is fitted on the validation photos' logits (export/calibration.py), so the
  probabilities the server returns mean what they say; expected calibration error before and
  after is reported.
- Familiarity: the cosine of a photo's pooled features to the nearest class's mean over the
  training photos. Car photos like the training set score high; a photo with no car scores low.
  Its threshold is the lowest familiarity of any validation photo, so it turns away no photo of
  a known model, only photos unlike all of them.
- The probability threshold is the highest that still keeps ACCEPT_SHARE of the validation
  photos. No other photos are used to choose either threshold; photos of other car models
  (`unknown`) and non-car photos (export/noncar_photos.py) only measure what the rule turns away.

Both rules were chosen by measuring, on the previous default model, top probability (raw and
calibrated), energy, max logit, feature distances and an ImageNet car signal on half of the
unknown-car photos: the probability scores tell known from unknown cars best (ROC AUC ~0.8), the
feature scores tell cars from non-cars best (~0.99), and no single score did both.

All photos are scored with the server's own Preprocessor, as the parity check does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from serve.preprocess import Preprocessor

from . import calibration
from .parity import IMAGE_SUFFIXES

ACCEPT_SHARE = 0.90
BATCH = 16
MAX_PIXELS = 200_000_000


def photos_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@torch.no_grad()
def logits_and_features(served, preprocessor: Preprocessor, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    logits, features = [], []
    for start in range(0, len(files), BATCH):
        pixels = torch.stack([preprocessor(p.read_bytes()) for p in files[start:start + BATCH]])
        batch_logits, batch_features = served.logits_and_features(pixels)
        logits.append(batch_logits)
        features.append(batch_features)
    return torch.cat(logits), torch.cat(features)


@dataclass
class Labelled:
    """Photos of the known classes: files and their class indices (from their folder's name)."""

    files: list[Path]
    labels: torch.Tensor


def labelled(files: list[Path], vocab: list[str]) -> Labelled:
    index = {name: i for i, name in enumerate(vocab)}
    kept = [f for f in files if f.parent.name in index]
    return Labelled(kept, torch.tensor([index[f.parent.name] for f in kept], dtype=torch.long))


@dataclass
class Fitted:
    temperature: float
    directions: torch.Tensor
    min_probability: float
    min_familiarity: float
    calibration: dict
    figures: dict = field(default_factory=dict)

    def acceptance(self) -> dict:
        return {"min_probability": round(self.min_probability, 6), "min_familiarity": round(self.min_familiarity, 6),
                "rule": f"accepted when the photo's familiarity is at least min_familiarity (the lowest of any "
                        f"validation photo) and the top probability at least min_probability (keeps "
                        f"{ACCEPT_SHARE:.0%} of validation photos)",
                "figures": self.figures}


def rejected_share(accepted: torch.Tensor) -> float:
    return round(1.0 - float(accepted.float().mean()), 4)


def fit(served, steps: list[dict], vocab: list[str], valid: Labelled, train: Labelled,
        unknown: list[Path], noncar: list[Path]) -> Fitted:
    """Fit the temperature and both thresholds, and measure what the rule accepts and turns away."""
    preprocessor = Preprocessor(steps, MAX_PIXELS)
    logits, features = logits_and_features(served, preprocessor, valid.files)
    _, train_features = logits_and_features(served, preprocessor, train.files)
    classes = len(vocab)
    temperature = calibration.fit_temperature(logits, valid.labels)
    before = calibration.expected_calibration_error(calibration.calibrated_probabilities(logits), valid.labels)
    after = calibration.expected_calibration_error(calibration.calibrated_probabilities(logits, temperature),
                                                   valid.labels)
    directions = calibration.class_directions(train_features, train.labels, classes)
    familiarity = calibration.familiarity(features, directions)
    top = calibration.top_probability(logits, temperature)
    min_familiarity = calibration.choose_threshold(familiarity, keep=1.0)
    min_probability = calibration.choose_threshold(top, keep=ACCEPT_SHARE)

    def accepted(batch_logits, batch_features) -> torch.Tensor:
        return calibration.acceptance(calibration.familiarity(batch_features, directions), min_familiarity) & \
            calibration.acceptance(calibration.top_probability(batch_logits, temperature), min_probability)

    kept = accepted(logits, features)
    right = logits.argmax(dim=1) == valid.labels
    figures = {
        "validation": {"photos": len(valid.files), "accepted": round(float(kept.float().mean()), 4),
                       "accuracy_of_accepted": round(float(right[kept].float().mean()), 4) if kept.any() else None,
                       "accuracy_of_all": round(float(right.float().mean()), 4)},
    }
    if unknown:
        unknown_logits, unknown_features = logits_and_features(served, preprocessor, unknown)
        figures["unknown_cars"] = {
            "photos": len(unknown), "rejected": rejected_share(accepted(unknown_logits, unknown_features)),
            "roc_auc_top_probability": round(calibration.roc_auc(
                top, calibration.top_probability(unknown_logits, temperature)), 4)}
    if noncar:
        noncar_logits, noncar_features = logits_and_features(served, preprocessor, noncar)
        figures["non_car"] = {"photos": len(noncar), "rejected": rejected_share(accepted(noncar_logits, noncar_features)),
                              "roc_auc_familiarity": round(calibration.roc_auc(
                                  familiarity, calibration.familiarity(noncar_features, directions)), 4)}
    return Fitted(temperature, directions, min_probability, min_familiarity,
                  {"temperature": round(temperature, 6), "ece_before": round(before, 4), "ece_after": round(after, 4),
                   "bins": calibration.ECE_BINS, "photos": len(valid.files), "fitted_on": "the validation photos"},
                  figures)


def describe(fitted: Fitted) -> list[str]:
    """The export log's lines about calibration and acceptance, with the issue's targets."""
    c, f = fitted.calibration, fitted.figures
    lines = [f"calibration: temperature {c['temperature']:.3f}; expected calibration error on the {c['photos']} "
             f"validation photos {c['ece_before']:.3f} before, {c['ece_after']:.3f} after (target <= 0.05)",
             f"acceptance: familiarity >= {fitted.min_familiarity:.3f} and top probability >= "
             f"{fitted.min_probability:.3f}"]
    v = f["validation"]
    lines.append(f"  validation: {v['accepted']:.1%} of {v['photos']} photos accepted (target >= 90 %), "
                 f"{(v['accuracy_of_accepted'] or 0):.1%} of the accepted right (target >= 93 %; "
                 f"{v['accuracy_of_all']:.1%} of all)")
    if "unknown_cars" in f:
        u = f["unknown_cars"]
        lines.append(f"  other car models: {u['rejected']:.1%} of {u['photos']} photos turned away (target >= 60 %); "
                     f"ROC AUC known vs unknown cars {u['roc_auc_top_probability']:.3f}")
    if "non_car" in f:
        n = f["non_car"]
        lines.append(f"  photos with no car: {n['rejected']:.1%} of {n['photos']} turned away (target >= 90 %)")
    return lines
