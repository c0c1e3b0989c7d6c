"""The two-level rule as the export fits and measures it: the make threshold, and what the rule
does with validation photos, other car models and non-car photos. The model's scores are given
directly, so the figures can be checked by hand."""

from pathlib import Path

import pytest
import torch

from export import acceptance, calibration

VOCAB = ["Audi A4 Sedan 2012", "Audi A6 Sedan 2012", "BMW M3 Coupe 2012"]
CLASSES = [{"label": v, "make": v.split()[0]} for v in VOCAB]
STEPS = [{"op": "resize", "method": "squish", "height": 8, "width": 8, "resample": "bilinear",
          "pad_mode": "reflection"}]


def photos(folder: str, n: int) -> list[Path]:
    return [Path("photos") / folder / f"{i}.jpg" for i in range(n)]


def row(*logits: float) -> list[float]:
    return list(logits)


@pytest.fixture()
def fitted(monkeypatch):
    # Validation: 17 sure and right; one torn between an Audi and the BMW (named the Audi, wrong;
    # still above the model threshold, which keeps 90 % of the 20); two torn between the two Audis,
    # below it, whose make is right.
    valid_logits = [row(8, 0, 0), row(0, 8, 0), row(0, 0, 8)] * 5 + [row(8, 0, 0), row(0, 8, 0)] + \
        [row(3, 0, 2.9), row(3, 3, 0), row(3, 3, 0)]
    valid_labels = [0, 1, 2] * 5 + [0, 1] + [2, 0, 1]
    valid = acceptance.Labelled(photos("valid", 20), torch.tensor(valid_labels))
    train = acceptance.Labelled(photos("train", 3), torch.tensor([0, 1, 2]))
    unknown = photos("Audi S8 Sedan 2012", 2) + photos("Volvo XC90 SUV 2007", 1)
    noncar = photos("noncar", 2)
    features = torch.eye(3)
    table = {
        tuple(valid.files): (torch.tensor(valid_logits), features[torch.tensor(valid_labels)]),
        tuple(train.files): (torch.zeros(3, 3), features),
        # Another Audi, torn between the two known ones; another Audi named as the A4; a Volvo
        # torn between the Audis (so given a wrong make).
        tuple(unknown): (torch.tensor([row(3, 3, 0), row(8, 0, 0), row(3, 3, 0)]), features[[0, 0, 0]]),
        # Unlike every training photo: its features point nowhere near a class.
        tuple(noncar): (torch.tensor([row(8, 0, 0), row(3, 3, 0)]), -features[[0, 1]]),
    }
    monkeypatch.setattr(acceptance, "logits_and_features", lambda served, pre, files: table[tuple(files)])
    return acceptance.fit(None, STEPS, VOCAB, valid, train, unknown, noncar, CLASSES)


def test_the_make_threshold_keeps_make_answers_right_often_enough(fitted):
    v = fitted.figures["validation"]
    assert fitted.min_make_probability is not None
    assert v["make_answers_right"] >= acceptance.MAKE_PRECISION
    # 18 at model level (one of them wrong); the two torn between the Audis get the make alone.
    assert v["accepted"] == pytest.approx(18 / 20, abs=1e-4)
    assert v["accuracy_of_accepted"] == pytest.approx(17 / 18, abs=1e-4)
    assert v["answered_make"] == pytest.approx(2 / 20, abs=1e-4) and v["make_answers_right"] == 1.0
    assert v["make_accuracy"] == pytest.approx(19 / 20, abs=1e-4)
    assert v["top5"] == 1.0


def test_other_models_and_non_car_photos(fitted):
    u = fitted.figures["unknown_cars"]
    assert u["named_as_known"] == pytest.approx(1 / 3, abs=1e-4)       # the Audi taken for the A4
    assert u["answered_right_make"] == pytest.approx(1 / 3, abs=1e-4)  # the torn Audi: "an Audi"
    assert u["answered_wrong_make"] == pytest.approx(1 / 3, abs=1e-4)  # the Volvo called an Audi
    assert u["not_named"] == pytest.approx(u["turned_away"] + u["answered_right_make"], abs=1e-4)
    assert fitted.figures["non_car"]["rejected"] == 1.0


def test_the_manifest_block_and_the_log_name_the_make_level(fitted):
    block = fitted.acceptance()
    assert block["min_make_probability"] == round(fitted.min_make_probability, 6)
    assert "make alone" in block["rule"]
    lines = "\n".join(acceptance.describe(fitted))
    assert "make-level top-1" in lines and "not named as a known model" in lines
    assert fitted.figures["confusions"][0]["count"] >= 1


def test_without_makes_there_is_no_make_level(monkeypatch, fitted):
    assert acceptance.Fitted(1.0, torch.eye(2), 0.5, 0.1, {}).acceptance().get("min_make_probability") is None
    assert calibration.choose_precision_threshold(torch.tensor([0.5]), torch.tensor([False]), 0.9) is None
