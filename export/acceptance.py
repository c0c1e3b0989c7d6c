"""Calibration and the "unknown" answer, measured at export on real photos.

- The temperature T is fitted on the validation photos' logits (export/calibration.py), so the
  probabilities the server returns mean what they say; expected calibration error before and
  after is reported.
- Familiarity: the cosine of a photo's pooled features to the nearest class's mean over the
  training photos. Car photos like the training set score high; a photo with no car scores low.
  Its threshold is the lowest familiarity of any validation photo, so it turns away no photo of
  a known model, only photos unlike all of them.
- The model an answer names is the server's (serve/model/postprocess.py): the most likely model of the
  most likely make, where the classes carry makes, else the most likely class. Top-1, the make
  level and the confused pairs are of that model; `most_likely_class` keeps the plain argmax's.
- The probability threshold, on the named model's probability, is the highest that still keeps
  ACCEPT_SHARE of the validation photos.
- The make threshold, for models whose classes carry makes: among the familiar validation photos
  that the model threshold turns away, the lowest make probability (the sum over a make's models)
  at which the make given is right at least MAKE_PRECISION of the time. Those photos then get
  the make alone as their answer. When no threshold is right that often, it is MAKE_OFF, which
  a sum of probabilities reaches only when the photo is all but certainly that make.
- Each threshold is measured as written into the manifest (six decimals, rounded down), and
  compared in float64 as the server compares it, so the figures are the server's.
No other photos are used to choose any threshold; photos of other car models (`unknown`) and
non-car photos (export/noncar_photos.py) only measure what the rule does with them. A choice
ever made on unknown-car photos must be made on some of their classes and measured on the
others: the figure measured on the photos it was chosen on would flatter it.

The share of unknown-car photos not named as a known model comes with a bootstrap interval over
their classes (calibration.class_bootstrap): with 16 other models, it tells how far the figure
may move on another 16.

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

from serve.model.postprocess import Makes, named_classes
from serve.model.preprocess import Preprocessor

from . import calibration
from .parity import IMAGE_SUFFIXES

ACCEPT_SHARE = 0.90
MAKE_PRECISION = 0.90
MAKE_OFF = 1.0
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
    min_make_probability: float | None = None  # None: the classes carry no makes

    def acceptance(self) -> dict:
        score = ("the top probability" if self.min_make_probability is None
                 else "the named model's probability (the most likely model of the most likely make)")
        rule = (f"accepted when the photo's familiarity is at least min_familiarity (the lowest of any validation "
                f"photo) and {score} at least min_probability (keeps {ACCEPT_SHARE:.0%} of validation photos)")
        make = {}
        if self.min_make_probability is not None:
            make = {"min_make_probability": round(self.min_make_probability, 6)}
            chosen = (f"off: no threshold made {MAKE_PRECISION:.0%}" if self.make_off
                      else f"the lowest at which {MAKE_PRECISION:.0%}")
            rule += (f"; otherwise the make alone is the answer when its probability (the sum over its models) is "
                     f"at least min_make_probability ({chosen} of such validation answers name the right make)")
        return {"min_probability": round(self.min_probability, 6), "min_familiarity": round(self.min_familiarity, 6),
                **make, "rule": rule, "figures": self.figures}

    @property
    def make_off(self) -> bool:
        return self.min_make_probability is not None and self.min_make_probability >= MAKE_OFF


@dataclass
class Levels:
    """What the two-level rule answers for each photo: the model, the make alone, or neither."""

    model: torch.Tensor  # bool [N]
    make: torch.Tensor   # bool [N]: the make alone (never where model is)
    top_make: torch.Tensor | None  # long [N]: the make given, when the model has makes

    @property
    def turned_away(self) -> torch.Tensor:
        return ~(self.model | self.make)


def rejected_share(accepted: torch.Tensor) -> float:
    return round(1.0 - float(accepted.float().mean()), 4)


def share(mask: torch.Tensor) -> float:
    return round(float(mask.double().mean()), 4) if mask.numel() else 0.0


def fit(served, steps: list[dict], vocab: list[str], valid: Labelled, train: Labelled,
        unknown: list[Path], noncar: list[Path], classes: list[dict] | None = None) -> Fitted:
    """Fit the temperature and the thresholds, and measure what the rule accepts and turns away.
    With `classes` (make, model, ... per class), the make level too."""
    preprocessor = Preprocessor(steps, MAX_PIXELS)
    logits, features = logits_and_features(served, preprocessor, valid.files)
    _, train_features = logits_and_features(served, preprocessor, train.files)
    classes_count = len(vocab)
    temperature = calibration.fit_temperature(logits, valid.labels)
    before = calibration.expected_calibration_error(calibration.calibrated_probabilities(logits), valid.labels)
    probabilities = calibration.calibrated_probabilities(logits, temperature)
    after = calibration.expected_calibration_error(probabilities, valid.labels)
    directions = calibration.class_directions(train_features, train.labels, classes_count)
    familiarity = calibration.familiarity(features, directions)
    makes = Makes([c["make"] for c in classes]) if classes else None

    def named(batch_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's named class and its probability."""
        index = named_classes(batch_p, makes)
        return index, batch_p.gather(1, index[:, None])[:, 0]

    predicted, top = named(probabilities)
    min_familiarity = calibration.written_threshold(calibration.choose_threshold(familiarity, keep=1.0))
    min_probability = calibration.written_threshold(calibration.choose_threshold(top, keep=ACCEPT_SHARE))
    min_make = None
    if makes is not None:
        familiar = calibration.acceptance(familiarity, min_familiarity)
        short = familiar & ~calibration.acceptance(top, min_probability)
        make_p, make = makes.probabilities(probabilities).max(dim=1)
        chosen = calibration.choose_precision_threshold(make_p[short], (make == makes.index[valid.labels])[short],
                                                        MAKE_PRECISION)
        min_make = MAKE_OFF if chosen is None else calibration.written_threshold(chosen)

    def levels(batch_logits, batch_features) -> Levels:
        batch_p = calibration.calibrated_probabilities(batch_logits, temperature)
        familiar = calibration.acceptance(calibration.familiarity(batch_features, directions), min_familiarity)
        model = familiar & calibration.acceptance(named(batch_p)[1], min_probability)
        if makes is None:
            return Levels(model, torch.zeros_like(model), None)
        make_p, make = makes.probabilities(batch_p).max(dim=1)
        by_make = familiar & ~model & calibration.acceptance(make_p, min_make)
        return Levels(model, by_make, make)

    right = predicted == valid.labels
    argmax = logits.argmax(dim=1)
    answered = levels(logits, features)
    kept = answered.model
    validation = {"photos": len(valid.files), "accepted": share(kept),
                  "accuracy_of_accepted": share(right[kept]) if kept.any() else None,
                  "accuracy_of_all": share(right), "top5": round(calibration.top_k_accuracy(probabilities,
                                                                                          valid.labels, 5), 4)}
    if makes is not None:
        true_make = makes.index[valid.labels]
        make_right = answered.top_make == true_make
        validation.update({"make_accuracy": share(makes.index[predicted] == true_make),
                           "most_likely_class": {"accuracy": share(argmax == valid.labels),
                                                 "make_accuracy": share(makes.index[argmax] == true_make)},
                           "answered_make": share(answered.make),
                           "make_answers_right": share(make_right[answered.make]) if answered.make.any() else None,
                           "turned_away": share(answered.turned_away)})
    figures = {"validation": validation,
               "confusions": calibration.confused_pairs(predicted, valid.labels, vocab)}
    if unknown:
        unknown_logits, unknown_features = logits_and_features(served, preprocessor, unknown)
        got = levels(unknown_logits, unknown_features)
        model_ids = {name: i for i, name in enumerate(sorted({f.parent.name for f in unknown}))}
        models = torch.tensor([model_ids[f.parent.name] for f in unknown])
        figures["unknown_cars"] = {
            "photos": len(unknown), "models": int(models.max()) + 1,
            "rejected": share(got.turned_away), "turned_away": share(got.turned_away),
            "rejected_interval": calibration.class_bootstrap(got.turned_away, models).as_dict(),
            "named_as_known": share(got.model),
            "roc_auc_top_probability": round(calibration.roc_auc(
                top, named(calibration.calibrated_probabilities(unknown_logits, temperature))[1]), 4)}
        if makes is not None:
            # An unknown model's make, from its folder's Stanford name; a make no class has is never right.
            true = torch.tensor([makes.names.index(m) if m in makes.names else -1 for m in photo_makes(unknown)])
            right_make = got.make & (got.top_make == true)
            figures["unknown_cars"].update({
                "answered_right_make": share(right_make), "answered_wrong_make": share(got.make & ~right_make),
                "not_named": share(got.turned_away | right_make),
                "not_named_interval": calibration.class_bootstrap(got.turned_away | right_make, models).as_dict()})
    if noncar:
        noncar_logits, noncar_features = logits_and_features(served, preprocessor, noncar)
        figures["non_car"] = {"photos": len(noncar),
                              "rejected": share(levels(noncar_logits, noncar_features).turned_away),
                              "roc_auc_familiarity": round(calibration.roc_auc(
                                  familiarity, calibration.familiarity(noncar_features, directions)), 4)}
    return Fitted(temperature, directions, min_probability, min_familiarity,
                  {"temperature": round(temperature, 6), "ece_before": round(before, 4), "ece_after": round(after, 4),
                   "bins": calibration.ECE_BINS, "photos": len(valid.files), "fitted_on": "the validation photos"},
                  figures, min_make)


def photo_makes(files: list[Path]) -> list[str | None]:
    """The make of each photo's class, from its folder's name (None where it is no Stanford name)."""
    from learners.classnames import ClassNameError, parse

    def make(folder: str) -> str | None:
        try:
            return parse(folder)["make"]
        except ClassNameError:
            return None

    return [make(f.parent.name) for f in files]


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def spread(interval: dict | None) -> str:
    """ ", 95 % interval 55.0-76.1 % over the 16 models" for the log; nothing without one."""
    if not interval:
        return ""
    return (f", {interval['level']:.0%} interval {interval['low']:.1%}-{interval['high']:.1%} over its "
            f"{interval['classes']} models")


def describe(fitted: Fitted) -> list[str]:
    """The export log's lines about accuracy, calibration and acceptance, with the targets."""
    c, f = fitted.calibration, fitted.figures
    v = f["validation"]
    if fitted.min_make_probability is None:
        make_rule = ""
    elif fitted.make_off:
        make_rule = (f"; make level off (no make threshold made {MAKE_PRECISION:.0%} of the make answers on "
                     f"validation right)")
    else:
        make_rule = f"; else the make alone when its probability >= {fitted.min_make_probability:.3f}"
    lines = [f"validation: top-1 {percent(v['accuracy_of_all'])} (target >= 80 %), top-5 {percent(v['top5'])} "
             f"(target >= 95 %)"
             + (f", make-level top-1 {percent(v['make_accuracy'])} (target >= 92 %)" if "make_accuracy" in v else "")
             + f" on {v['photos']} photos"
             + (f" (naming the most likely class instead: top-1 {percent(v['most_likely_class']['accuracy'])}, make "
                f"level {percent(v['most_likely_class']['make_accuracy'])})" if "most_likely_class" in v else ""),
             f"calibration: temperature {c['temperature']:.3f}; expected calibration error on the {c['photos']} "
             f"validation photos {c['ece_before']:.3f} before, {c['ece_after']:.3f} after (target <= 0.05)",
             f"acceptance: familiarity >= {fitted.min_familiarity:.3f} and the named model's probability >= "
             f"{fitted.min_probability:.3f}{make_rule}",
             f"  validation: {percent(v['accepted'])} of {v['photos']} photos accepted at model level "
             f"(target >= 90 %), {percent(v['accuracy_of_accepted'])} of those right (target >= 93 %)"]
    if "answered_make" in v:
        lines.append(f"  validation: {percent(v['answered_make'])} answered with the make alone, "
                     f"{percent(v['make_answers_right'])} of those the right make "
                     f"(target >= {MAKE_PRECISION * 100:.0f} %); "
                     f"{percent(v['turned_away'])} turned away")
    if "unknown_cars" in f:
        u = f["unknown_cars"]
        if "not_named" in u:
            lines.append(f"  other car models: {percent(u['not_named'])} of {u['photos']} photos not named as a known "
                         f"model (target >= 60 %){spread(u.get('not_named_interval'))}: "
                         f"{percent(u['turned_away'])} turned away, "
                         f"{percent(u['answered_right_make'])} answered with the right make; "
                         f"{percent(u['answered_wrong_make'])} with a wrong make, {percent(u['named_as_known'])} named "
                         f"as a known model")
        else:
            lines.append(f"  other car models: {percent(u['rejected'])} of {u['photos']} photos turned away "
                         f"(target >= 60 %){spread(u.get('rejected_interval'))}")
        lines.append(f"  ROC AUC known vs unknown cars {u['roc_auc_top_probability']:.3f}")
    if "non_car" in f:
        n = f["non_car"]
        lines.append(f"  photos with no car: {percent(n['rejected'])} of {n['photos']} turned away at both levels "
                     f"(target >= 90 %)")
    if f.get("confusions"):
        lines.append(f"the {len(f['confusions'])} most confused pairs on validation (mistakes either way):")
        lines.extend(f"  {p['count']:3d}  {p['a']} / {p['b']}" for p in f["confusions"])
    return lines
