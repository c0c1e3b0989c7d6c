"""The two-level rule as the export fits and measures it: the make threshold, and what the rule
does with validation photos, other car models and non-car photos. The model's scores are given
directly, so the figures can be checked by hand."""

from pathlib import Path

import pytest
import torch

from export import acceptance

VOCAB = ["Audi A4 Sedan 2012", "Audi A6 Sedan 2012", "BMW M3 Coupe 2012"]
CLASSES = [{"label": v, "make": v.split()[0]} for v in VOCAB]
STEPS = [{"op": "resize", "method": "squish", "height": 8, "width": 8, "resample": "bilinear",
          "pad_mode": "reflection"}]


def photos(folder: str, n: int) -> list[Path]:
    return [Path("photos") / folder / f"{i}.jpg" for i in range(n)]


def row(*logits: float) -> list[float]:
    return list(logits)


# Validation: 17 sure and right; one torn between an Audi and the BMW (named the Audi, wrong;
# still above the model threshold, which keeps 90 % of the 20); two torn between the two Audis,
# below it, whose make is right.
VALID_LOGITS = [row(8, 0, 0), row(0, 8, 0), row(0, 0, 8)] * 5 + [row(8, 0, 0), row(0, 8, 0)] + \
    [row(3, 0, 2.9), row(3, 3, 0), row(3, 3, 0)]
VALID_LABELS = [0, 1, 2] * 5 + [0, 1] + [2, 0, 1]


def fit_on(monkeypatch, valid_labels=VALID_LABELS, vocab=VOCAB, classes=CLASSES,
           valid_logits=VALID_LOGITS) -> acceptance.Fitted:
    """acceptance.fit on the given scores: VALID_LOGITS for the validation photos (labelled
    `valid_labels`), and fixed ones for training, other car models and non-car photos."""
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
    return acceptance.fit(None, STEPS, vocab, valid, train, unknown, noncar, classes)


@pytest.fixture()
def fitted(monkeypatch):
    return fit_on(monkeypatch)


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


def test_the_figures_are_of_the_model_an_answer_names(monkeypatch):
    # The first photo, an A4, torn three ways: the BMW is its likeliest class, but the two Audis
    # together outweigh it, so the answer names the likelier Audi, as the server does.
    fitted = fit_on(monkeypatch, valid_logits=[row(3, 3, 3.1)] + VALID_LOGITS[1:])
    v = fitted.figures["validation"]
    assert v["accuracy_of_all"] == pytest.approx(18 / 20, abs=1e-4)
    assert v["make_accuracy"] == pytest.approx(19 / 20, abs=1e-4)
    assert v["most_likely_class"] == {"accuracy": pytest.approx(17 / 20, abs=1e-4),
                                      "make_accuracy": pytest.approx(18 / 20, abs=1e-4)}
    described = "\n".join(acceptance.describe(fitted))
    assert "naming the most likely class instead: top-1 85.0%, make level 90.0%" in described


def test_other_models_and_non_car_photos(fitted):
    u = fitted.figures["unknown_cars"]
    assert u["named_as_known"] == pytest.approx(1 / 3, abs=1e-4)       # the Audi taken for the A4
    assert u["answered_right_make"] == pytest.approx(1 / 3, abs=1e-4)  # the torn Audi: "an Audi"
    assert u["answered_wrong_make"] == pytest.approx(1 / 3, abs=1e-4)  # the Volvo called an Audi
    assert u["not_named"] == pytest.approx(u["turned_away"] + u["answered_right_make"], abs=1e-4)
    # Its spread over the two other models: the Audi's photos are half not named, the Volvo's none,
    # so a resampled pair of models gives 0 (two Volvos) up to 1/2 (two Audis).
    assert u["models"] == 2
    assert (u["not_named_interval"]["low"], u["not_named_interval"]["high"]) == (0.0, 0.5)
    assert "95% interval 0.0%-50.0% over its 2 models" in "\n".join(acceptance.describe(fitted))
    assert fitted.figures["non_car"]["rejected"] == 1.0


def test_the_manifest_block_and_the_log_name_the_make_level(fitted):
    block = fitted.acceptance()
    assert block["min_make_probability"] == round(fitted.min_make_probability, 6)
    assert "make alone" in block["rule"]
    lines = "\n".join(acceptance.describe(fitted))
    assert "make-level top-1" in lines and "not named as a known model" in lines
    assert fitted.figures["confusions"][0]["count"] >= 1


def test_the_thresholds_measured_are_the_ones_written(fitted):
    block = fitted.acceptance()
    assert block["min_probability"] == fitted.min_probability
    assert block["min_familiarity"] == fitted.min_familiarity
    assert block["min_make_probability"] == fitted.min_make_probability


def test_when_no_make_threshold_is_right_often_enough_the_make_level_is_off(monkeypatch):
    # The two photos torn between the Audis are BMWs: every make answer below the model level is wrong.
    fitted = fit_on(monkeypatch, valid_labels=VALID_LABELS[:-2] + [2, 2])
    block = fitted.acceptance()
    assert block["min_make_probability"] == acceptance.MAKE_OFF == 1.0
    assert "off" in block["rule"]
    v = fitted.figures["validation"]
    assert v["answered_make"] == 0.0 and v["make_answers_right"] is None
    assert v["turned_away"] == pytest.approx(2 / 20, abs=1e-4)
    assert fitted.figures["unknown_cars"]["answered_right_make"] == 0.0
    assert "make level off" in "\n".join(acceptance.describe(fitted))


def test_without_makes_there_is_no_make_level(monkeypatch):
    fitted = fit_on(monkeypatch, classes=None)
    assert fitted.min_make_probability is None
    block = fitted.acceptance()
    assert "min_make_probability" not in block and "make" not in block["rule"]
    v, u = fitted.figures["validation"], fitted.figures["unknown_cars"]
    assert not {"make_accuracy", "answered_make", "make_answers_right"} & v.keys()
    assert not {"answered_right_make", "answered_wrong_make", "not_named"} & u.keys()
    # Without the make level, whatever the model level turns away is turned away.
    assert u["rejected"] == u["turned_away"] == pytest.approx(1 - u["named_as_known"], abs=1e-4)
    assert fitted.figures["non_car"]["rejected"] == 1.0
    lines = "\n".join(acceptance.describe(fitted))
    assert "make" not in lines and "top-5" in lines and "confused" in lines


def test_confusions_are_the_validation_mistakes(fitted):
    # A BMW named as the Audi A4, then an A6 torn between the Audis named as the A4 (the first of a tie).
    assert fitted.figures["confusions"] == [{"a": VOCAB[0], "b": VOCAB[2], "count": 1},
                                            {"a": VOCAB[0], "b": VOCAB[1], "count": 1}]


def test_describe_names_every_target(fitted):
    lines = "\n".join(acceptance.describe(fitted))
    for target in ("top-1 90.0% (target >= 80 %)", "top-5 100.0% (target >= 95 %)",
                   "make-level top-1 95.0% (target >= 92 %)", "accepted at model level (target >= 90 %)",
                   "of those right (target >= 93 %)", "not named as a known model (target >= 60 %)",
                   "turned away at both levels (target >= 90 %)", "(target <= 0.05)"):
        assert target in lines
    assert f"{VOCAB[0]} / {VOCAB[2]}" in lines


def test_a_model_whose_labels_are_no_car_names_is_exported_without_makes(capsys, tmp_path):
    from export import cli

    assert cli.class_fields(["cat", "dog"], {"data": str(tmp_path)}) is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "make answer is off" in out[0] and "'cat'" in out[0]
    # Stanford names parse, with or without a data folder here.
    for info in ({}, {"data": str(tmp_path / "gone")}, {"data": str(tmp_path)}):
        fields = cli.class_fields(VOCAB, info)
        assert [(c["label"], c["name"], c["make"]) for c in fields] == [(v, v, v.split()[0]) for v in VOCAB]
    assert capsys.readouterr().out == ""
