"""Knowledge distillation: the student's loss uses the cached teacher outputs of its batch's
photos; a cache or a checkpoint of other teachers, photos or sizes is refused; a teacher of
other classes stops the run before its first epoch."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import LabelSmoothingCrossEntropyFlat
from torch.utils.data import Dataset

from learners.learner import load
from tests.support.paths import CARS, ROOT
from tests.support.tiny_artifact import write_tiny_artifact
from train import checkpoint, distill

CLASSES = sorted(p.name for p in CARS.iterdir() if p.is_dir())
RECIPE = ["--size", "48", "--early-size", "32", "--final-epochs", "1", "--epochs", "2", "--freeze-epochs", "1",
          "--batch-size", "8", "--no-pretrained", "--quiet"]


# --- the loss -------------------------------------------------------------------------------------

def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 3, generator=g)
    labels = torch.randint(0, 3, (6,), generator=g)
    teacher = torch.softmax(torch.randn(6, 3, generator=g), dim=-1)
    return logits, labels, teacher


def test_a_zero_weight_is_the_plain_loss():
    logits, labels, teacher = batch()
    base = LabelSmoothingCrossEntropyFlat()
    loss = distill.DistillLoss(base, 0.0, 2.0)
    loss.targets = teacher
    assert torch.equal(loss(logits, labels), base(logits, labels))


def test_the_loss_uses_the_teachers_targets():
    logits, labels, teacher = batch()
    base = LabelSmoothingCrossEntropyFlat()
    loss = distill.DistillLoss(base, 0.5, 2.0)
    loss.targets = teacher
    with_teacher = loss(logits, labels)
    loss.targets = teacher.flip(-1)
    other_teacher = loss(logits, labels)
    assert not torch.isclose(with_teacher, other_teacher)
    expected = 0.5 * base(logits, labels) + 0.5 * 4.0 * torch.nn.functional.kl_div(
        torch.log_softmax(logits / 2.0, -1), teacher, reduction="batchmean")
    assert torch.isclose(with_teacher, expected)
    # Without targets (validation batches) the loss is the label loss alone.
    loss.targets = None
    assert torch.equal(loss(logits, labels), base(logits, labels))


def test_the_distillation_term_is_zero_when_the_student_agrees_with_the_teacher():
    logits, _, _ = batch()
    same = torch.softmax(logits / 3.0, dim=-1)
    assert distill.kd_loss(logits, same, 3.0).abs() < 1e-6
    assert distill.kd_loss(logits, same.flip(-1), 3.0) > 0.01


def test_an_ensemble_averages_the_teachers_softened_probabilities():
    one, two = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    targets = distill.soft_targets(torch.stack([one, two]), 2.0)
    expected = (torch.softmax(one / 2.0, -1) + torch.softmax(two / 2.0, -1)) / 2
    assert torch.allclose(targets, expected)
    assert torch.allclose(targets.sum(-1), torch.ones(4, 2))


# --- which photo each batch row is ----------------------------------------------------------------

class Marked(Dataset):
    """Image i is zero but for the value i + 1 in its top-left pixel: its index, and whether it
    was mirrored (the value then sits top-right), can be read off the batch."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.zeros(3, 4, 4)
        x[:, 0, 0] = i + 1
        return x, i % 3


class Check(Callback):
    order = 62  # after Distill

    def __init__(self, loss, targets):
        self.loss, self.targets, self.rows = loss, targets, 0

    def before_batch(self):
        if not self.training:
            assert self.loss.targets is None
            return
        x = self.xb[0][:, 0]
        mirrored = (x[:, 0, -1] > 0).long()
        index = (x[:, 0, 0] + x[:, 0, -1]).long() - 1
        assert torch.equal(self.loss.targets, self.targets[index, mirrored])
        self.rows += len(index)
        self.mirrored = getattr(self, "mirrored", 0) + int(mirrored.sum())


def test_each_batch_row_gets_its_own_photos_targets_under_shuffling_and_mirroring():
    n = 24
    data = Marked(n)
    dls = DataLoaders.from_dsets(data, Marked(6), bs=4, shuffle=True, drop_last=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    base = LabelSmoothingCrossEntropyFlat()
    loss = distill.DistillLoss(base, 0.5, 2.0)
    # Targets that name the photo and the view: (photos, views, classes).
    targets = torch.arange(n * 2 * 3, dtype=torch.float32).view(n, 2, 3)
    labels = torch.tensor([i % 3 for i in range(n)])
    learn = Learner(dls, model, loss_func=loss)
    check = Check(loss, targets)
    learn.fit(2, 1e-3, cbs=[distill.Distill(loss, targets, labels, True, [dls.train]), check])
    assert check.rows == 2 * n
    assert 0 < check.mirrored < 2 * n
    # The loaders are left as they were, so the exported learner does not need this module.
    assert "get_idxs" not in dls.train.__dict__ and "epoch_order" not in dls.train.__dict__


def test_a_batch_whose_labels_are_not_its_photos_stops_the_run():
    n = 8
    dls = DataLoaders.from_dsets(Marked(n), Marked(4), bs=4, shuffle=True, drop_last=True)
    loss = distill.DistillLoss(LabelSmoothingCrossEntropyFlat(), 0.5, 2.0)
    wrong = torch.tensor([(i + 1) % 3 for i in range(n)])
    learn = Learner(dls, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)), loss_func=loss)
    with pytest.raises(RuntimeError, match="item order is lost"):
        learn.fit(1, 1e-3, cbs=[distill.Distill(loss, torch.zeros(n, 2, 3), wrong, False, [dls.train])])


# --- classes and the cache ------------------------------------------------------------------------

def test_the_class_difference_names_the_classes():
    assert distill.class_difference(["b", "a"], ["a", "b"]) is None
    line = distill.class_difference(["a", "b", "x"], ["a", "b", "c", "d"])
    assert line.startswith("has 3 classes, 3 differ from DATA")
    assert "not taught: c, d" in line and "not in DATA: x" in line


def key(**changes) -> dict:
    base = {"teachers": ["aa"], "photos": "ff", "items": ["a/1.jpg", "b/2.jpg"], "sizes": [224],
            "classes": ["a", "b"]}
    return {**base, **changes}


@pytest.mark.parametrize("changed, says", [
    (dict(teachers=["bb"]), "other teacher weights"),
    (dict(photos="ee"), "other photos"),
    (dict(items=["a/1.jpg"]), "other photos"),
    (dict(sizes=[256]), "another input size ([224] px, now [256] px)"),
])
def test_a_cache_of_other_weights_photos_or_size_is_refused_in_one_line(tmp_path, changed, says):
    path = tmp_path / distill.CACHE
    logits = torch.randn(1, 2, 2, 2)
    distill.write_cache(path, key(), logits)
    assert torch.equal(distill.read_cache(path, key()), logits)
    with pytest.raises(distill.TeacherError) as refused:
        distill.read_cache(path, key(**changed))
    message = str(refused.value)
    assert says in message and "\n" not in message and "delete it" in message


def test_no_cache_is_none_and_a_torn_one_is_refused(tmp_path):
    path = tmp_path / distill.CACHE
    assert distill.read_cache(path, key()) is None
    path.write_bytes(b"not a cache")
    with pytest.raises(distill.TeacherError, match="cannot be read"):
        distill.read_cache(path, key())


# --- python -m train with a teacher ---------------------------------------------------------------

def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", str(CARS), "--out", str(out), *RECIPE, *extra],
                          cwd=ROOT, capture_output=True, text=True)


def teacher(folder: Path, labels=CLASSES) -> Path:
    """A tiny artifact over the fixture's classes (a softmax over colour means)."""
    return write_tiny_artifact(folder, labels=list(labels), checks=False)


def retrained(folder: Path) -> None:
    """The same teacher path with other weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(folder / "model.pt"))
        with torch.no_grad():
            model.weight.mul_(2.0)
        torch.jit.save(model, str(folder / "model.pt"))


def test_a_teacher_of_other_classes_stops_the_run_before_its_first_epoch(tmp_path):
    other = teacher(tmp_path / "teacher", [*CLASSES[:2], "Tesla Model S Sedan 2012"])
    run = train(tmp_path / "out", "--teacher", str(other))
    assert run.returncode != 0
    assert "epoch 1" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert f"teacher {other} has 3 classes, 2 differ from DATA" in last
    assert CLASSES[2] in last and "Tesla Model S Sedan 2012" in last


def test_a_stopped_distillation_run_resumes_to_the_same_weights(tmp_path):
    taught = teacher(tmp_path / "teacher")
    whole = train(tmp_path / "whole", "--teacher", str(taught))
    assert whole.returncode == 0, whole.stderr
    assert "20 photos x 2 views" in whole.stderr and (tmp_path / "whole" / distill.CACHE).is_file()
    first = train(tmp_path / "parts", "--teacher", str(taught), "--stop-after", "2")
    assert first.returncode == 0, first.stderr
    second = train(tmp_path / "parts", "--teacher", str(taught))
    assert second.returncode == 0, second.stderr
    # The teachers ran once: the resumed run read their outputs back.
    assert "teacher outputs from" in second.stderr and "photos x 2 views" not in second.stderr
    assert "going on from the checkpoint after epoch 2 of 3" in second.stderr
    expected = load(tmp_path / "whole" / "export.pkl").model.state_dict()
    got = load(tmp_path / "parts" / "export.pkl").model.state_dict()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # The exported learner's loss is the plain one again: loading it needs fastai alone.
    assert type(load(tmp_path / "parts" / "export.pkl").loss_func).__name__ == "LabelSmoothingCrossEntropyFlat"


def test_other_teacher_weights_are_refused_by_the_checkpoint_and_by_the_cache(tmp_path):
    taught = teacher(tmp_path / "teacher")
    out = tmp_path / "out"
    assert train(out, "--teacher", str(taught), "--stop-after", "1").returncode == 0
    retrained(taught)
    run = train(out, "--teacher", str(taught))
    assert run.returncode != 0 and "other teacher weights" in run.stderr.strip().splitlines()[-1]
    (out / checkpoint.FILE).unlink()
    run = train(out, "--teacher", str(taught))
    assert run.returncode != 0 and "epoch 1" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert f"{out / distill.CACHE} was made from other teacher weights" in last
    fresh = train(out, "--teacher", str(taught), "--fresh", "--stop-after", "1")
    assert fresh.returncode == 0, fresh.stderr
    assert "photos x 2 views" in fresh.stderr
