"""The make-aware training loss: the make's probability is the sum of its models'."""

import json
import subprocess
import sys

import pytest
import torch
from fastai.losses import LabelSmoothingCrossEntropyFlat

from learners.learner import load
from tests.support.paths import CARS, ROOT
from train.makeloss import MakeAwareLoss, make_index, make_log_probs

LABELS = ["Audi S4 Sedan 2007", "Audi S4 Sedan 2012", "Aston Martin V8 Vantage Coupe 2012", "BMW M3 Coupe 2012"]


def test_makes_are_parsed_from_the_labels_multi_word_makes_included():
    makes, groups = make_index(LABELS)
    assert makes == ["Aston Martin", "Audi", "BMW"]
    assert groups.tolist() == [1, 1, 0, 2]


def test_the_make_log_probability_is_the_log_of_its_models_summed():
    _, groups = make_index(LABELS)
    logits = torch.randn(5, 4)
    p = logits.softmax(-1)
    expected = torch.stack([p[:, 2], p[:, 0] + p[:, 1], p[:, 3]], dim=1).log()
    assert torch.allclose(make_log_probs(logits, groups, 3), expected, atol=1e-6)


def test_a_wrong_model_of_the_right_make_costs_less_than_a_wrong_make():
    loss = MakeAwareLoss(LabelSmoothingCrossEntropyFlat(), LABELS, weight=1.0)
    target = torch.tensor([0])
    sibling = torch.tensor([[0.0, 3.0, 0.0, 0.0]])   # the other Audi S4 is favoured
    stranger = torch.tensor([[0.0, 0.0, 0.0, 3.0]])  # the BMW, equally favoured
    assert torch.isclose(loss.base(sibling, target), loss.base(stranger, target))
    assert loss(sibling, target) < loss(stranger, target)
    # Predictions stay per model.
    assert loss.decodes(sibling).tolist() == [1]
    with pytest.raises(ValueError):
        MakeAwareLoss(LabelSmoothingCrossEntropyFlat(), LABELS, weight=0.0)


def test_a_run_with_the_make_loss_exports_a_learner_with_fastais_loss(tmp_path):
    subprocess.run([sys.executable, "-m", "train", str(CARS), "--out", str(tmp_path), "--size", "48",
                    "--final-epochs", "1", "--epochs", "1", "--freeze-epochs", "1", "--batch-size", "8",
                    "--make-loss", "0.5", "--quiet"], check=True, cwd=ROOT)
    learn = load(tmp_path / "export.pkl")
    assert type(learn.loss_func) is LabelSmoothingCrossEntropyFlat
    assert json.loads((tmp_path / "export.pkl.json").read_text())["training"]["make_loss"] == 0.5
