"""The recipe's training stages (progressive resizing, mixing, weight averaging) and its defaults."""

import json
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from export.transforms import read_pipeline
from learners.learner import load
from serve.model.manifest import Manifest
from tests.support.paths import ARTIFACT, CARS, ROOT
from train.cli import DEFAULTS, DISTILL_DEFAULTS, parse_args
from train.stages import WeightAverage


def fake_learner(model: nn.Module, epoch: int) -> SimpleNamespace:
    return SimpleNamespace(model=model, training=True, epoch=epoch)


def test_weight_average_is_an_exponential_average_from_its_start_epoch():
    model = nn.Linear(2, 1, bias=False)
    average = WeightAverage(0.5, start_epoch=1)
    average.learn = fake_learner(model, epoch=0)
    with torch.no_grad():
        model.weight.fill_(100.0)
        average.after_batch()  # before the start epoch: not averaged
        average.learn.epoch = 1
        model.weight.fill_(2.0)
        average.after_batch()  # the first averaged step starts the average
        model.weight.fill_(4.0)
        average.after_batch()  # 0.5 * 2 + 0.5 * 4
    assert average.steps == 2
    assert average.apply(model)
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))


def test_weight_average_skips_validation_and_leaves_an_untrained_model_alone():
    model = nn.Linear(2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(0.9)
    average.learn = SimpleNamespace(model=model, training=False, epoch=0)
    average.after_batch()
    assert not average.apply(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        WeightAverage(1.0)


def test_progressive_mixed_averaged_training_exports_the_final_size(tmp_path):
    subprocess.run([sys.executable, "-m", "train", str(CARS), "--out", str(tmp_path), "--size", "64",
                    "--early-size", "48", "--final-epochs", "1", "--epochs", "2", "--freeze-epochs", "1",
                    "--batch-size", "8", "--cutmix", "1.0", "--ema", "0.9", "--drop-path", "0.1", "--quiet"],
                   check=True, cwd=ROOT)
    learn = load(tmp_path / "export.pkl")
    steps = read_pipeline(learn.dls).steps
    assert (steps[0]["height"], steps[0]["width"]) == (64, 64)  # what is served, not the early size
    # Training-only callbacks are not pickled into the learner.
    assert not {"CutMix", "SwitchSize", "WeightAverage"} & {type(cb).__name__ for cb in learn.cbs}
    training = json.loads((tmp_path / "export.pkl.json").read_text())["training"]
    assert (training["early_size"], training["final_epochs"], training["cutmix"], training["ema"]) == (48, 1, 1.0, 0.9)


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "24", "--final-epochs", "8"], 16),
    (["--epochs", "1", "--final-epochs", "8"], 0),             # a short run trains at the served size only
    (["--epochs", "24", "--final-epochs", "8", "--early-size", "352"], 0),  # same size: nothing to switch
])
def test_early_epochs_are_those_before_the_final_ones(argv, expected):
    from train.cli import early_epochs, parse_args

    assert early_epochs(parse_args([str(CARS), "--size", "352", *argv])) == expected


def test_flags_that_cannot_work_together_are_refused(tmp_path):
    for extra in (["--mixup", "0.4", "--cutmix", "1.0"], ["--final-epochs", "0"], ["--ema", "1.0"],
                  ["--make-loss", "0.5", "--mixup", "0.4"], ["--make-loss", "-1"]):
        result = subprocess.run([sys.executable, "-m", "train", str(CARS), "--out", str(tmp_path), *extra],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2, extra
        assert not (tmp_path / "export.pkl").exists()


def makefile_value(name: str) -> str:
    """A variable's default as the Makefile sets it (`NAME ?= value`)."""
    found = re.search(rf"^{name}\s*\?=[ \t]*(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert found, f"the Makefile sets no {name}"
    return found.group(1).strip()


def same_recipe(recorded: dict, argv: list[str]) -> None:
    """The options of DEFAULTS that `recorded` holds are those `python -m train DATA *argv` gets,
    and an option the recorded run predates is off."""
    got = vars(parse_args([str(CARS), *argv]))
    assert {k: recorded[k] for k in DEFAULTS if k in recorded} == {k: got[k] for k in DEFAULTS if k in recorded}
    assert not any(got[k] for k in DEFAULTS if k not in recorded), "an option newer than the model is on"
    assert recorded["arch"] == got["arch"] and recorded["resize"] == got["resize"]


def test_make_train_with_its_defaults_is_the_committed_models_recipe():
    """The README promises that `make train` reproduces the committed model: the student's two
    runs must be the ones recorded in that model's manifest, the first with `python -m train`'s
    defaults and the Makefile's STUDENT_ARGS, the second, going on from it, with its FINISH_ARGS,
    both distilled from as many teachers as the Makefile trains, at the distillation defaults."""
    source = Manifest.read(ARTIFACT).data["source"]
    finish, first = source["training"], source["resumed_from"]
    # The Makefile's DATA is the folder the model was trained on; any folder stands in for it
    # here, as the defaults do not depend on it and the data need not be beside the checkout.
    assert makefile_value("DATA") == first["data"] == finish["data"]
    assert first["resume"] is None
    same_recipe(first, shlex.split(makefile_value("STUDENT_ARGS")))
    base = makefile_value("BASE_LEARNER").replace("$(MODELS)", makefile_value("MODELS"))
    assert finish["resume"] == base
    same_recipe(finish, ["--resume", base, *shlex.split(makefile_value("FINISH_ARGS"))])
    teachers = len(shlex.split(makefile_value("TEACHER_SEEDS")))
    for run in (first, finish):
        assert len(run["teacher"]) == teachers
        assert (run["distill"], run["temperature"]) == (DISTILL_DEFAULTS["distill"], DISTILL_DEFAULTS["temperature"])


def test_the_recipe_check_tells_the_runs_apart():
    """The check above fails when the second run's options are not the ones it recorded."""
    finish = Manifest.read(ARTIFACT).data["source"]["training"]
    with pytest.raises(AssertionError):
        same_recipe(finish, [])
