"""Knowledge distillation: the student learns from its labels and from one or more teachers'
softened probabilities.

The teachers' share of a student epoch is kept small by running them once: their logits for a
fixed set of views of every training photo (as is, and mirrored) go into a cache file in --out,
and every epoch reads the targets of its batch from there. A teacher is an exported fastai
learner (export.pkl) or a whatcar artifact folder (model.pt and labels.txt). Several teachers
are an ensemble: their softened probabilities are averaged.

Which photo a batch row is comes from the order fastai's training loader drew its items in this
epoch, and the batch's labels are checked against the cached ones, so a mismatch stops the run
instead of training on another photo's targets. With augmentation, fastai's random flip is
replaced by one the distillation callback draws itself, so that it knows which rows are mirrored
and takes the mirrored view's targets for them; the flip comes after rotation and zoom instead of
before, which their symmetric ranges make no difference to.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from ops import atomic

from . import checkpoint, precision

CACHE = "teacher-cache.pt"
CACHE_FORMAT = 1
PLAIN, MIRRORED = 0, 1
VIEWS = ("plain", "mirrored")


class TeacherError(Exception):
    """A teacher that cannot teach this student, or a cache that is not this run's; one line."""


@dataclass
class Teacher:
    """One teacher, ready to score photos: `logits(items)` gives its logits for the plain view
    of each photo, at `size` px, over `labels` (the order its outputs come in)."""

    name: str
    labels: list[str]
    size: int
    digest: str
    _score: object = field(repr=False)  # (paths, mirrored) -> logits over `labels`

    def logits(self, items: list[Path], mirrored: bool = False) -> torch.Tensor:
        return self._score(items, mirrored)


def _resized(items: list[Path], size: int, method: str) -> torch.Tensor:
    """The photos as fastai's validation pipeline resizes them, as one uint8 NCHW batch."""
    from fastai.vision.all import PILImage, Resize, ResizeMethod, image2tensor

    resize = Resize(size, method=getattr(ResizeMethod, method.capitalize()))
    return torch.stack([image2tensor(resize(PILImage.create(p), split_idx=1)) for p in items])


def _learner_teacher(path: Path) -> Teacher:
    from learners import learner as learner_io

    try:
        learn = learner_io.load(path)
    except learner_io.LearnerError as exc:
        raise TeacherError(f"teacher {path}: {exc}") from None
    model = learn.model.eval()

    def score(items: list[Path], mirrored: bool) -> torch.Tensor:
        # The teacher's own validation pipeline: its size, resize and normalisation.
        x = learn.dls.test_dl(items, bs=len(items)).one_batch()[0]
        x = torch.flip(x, dims=[3]) if mirrored else x
        return model(x.contiguous(memory_format=torch.channels_last)).float()

    sizes = [f.size for f in learn.dls.valid.after_item.fs if hasattr(f, "size")]
    size = int(sizes[0][0]) if sizes else int((learner_io.read_sidecar(path).get("training") or {}).get("size", 0))
    return Teacher(str(path), [str(v) for v in learn.dls.vocab], size, checkpoint.weights_digest(model), score)


def _artifact_teacher(folder: Path) -> Teacher:
    model_file, labels_file, manifest_file = folder / "model.pt", folder / "labels.txt", folder / "manifest.json"
    if not (model_file.is_file() and labels_file.is_file() and manifest_file.is_file()):
        raise TeacherError(f"teacher {folder} is a folder without model.pt, labels.txt and manifest.json; "
                           "give an artifact version folder or an export.pkl")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        steps = manifest["preprocessing"]["steps"]
        output = manifest.get("output", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TeacherError(f"teacher {folder}: cannot read its manifest ({type(exc).__name__})") from None
    if len(steps) != 1 or steps[0].get("op") != "resize" or steps[0].get("height") != steps[0].get("width"):
        raise TeacherError(f"teacher {folder}: only a single square resize step is supported, its manifest has "
                           f"{[s.get('op') for s in steps]}")
    size, method = int(steps[0]["height"]), str(steps[0].get("method", "squish"))
    softmax = output.get("activation") == "softmax"
    # The module returns calibrated probabilities softmax(z / t); t * log p is z up to a per-photo
    # constant, which a softmax ignores.
    temperature = float(output.get("temperature") or 1.0)
    labels = [line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice, on every load
        model = torch.jit.load(str(model_file), map_location="cpu").eval()

    def score(items: list[Path], mirrored: bool) -> torch.Tensor:
        x = _resized(items, size, method)  # uint8: the artifact normalises inside the module
        x = torch.flip(x, dims=[3]) if mirrored else x
        out = model(x)
        out = (out[0] if isinstance(out, (tuple, list)) else out).float()
        return temperature * torch.log(out.clamp_min(1e-30)) if softmax else out

    return Teacher(str(folder), labels, size, checkpoint.weights_digest(model), score)


def load_teacher(path: Path) -> Teacher:
    if path.is_dir():
        return _artifact_teacher(path)
    if path.is_file():
        return _learner_teacher(path)
    raise TeacherError(f"teacher {path} not found: give an export.pkl or an artifact version folder")


def class_difference(teacher: list[str], data: list[str]) -> str | None:
    """What sets a teacher's classes apart from the data's, or None when they are the same set
    (in any order: the outputs are put in the data's order)."""
    missing = [c for c in data if c not in set(teacher)]
    extra = [c for c in teacher if c not in set(data)]
    if not missing and not extra:
        return None
    parts = ([f"not taught: {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")]
             if missing else [])
    parts += ([f"not in DATA: {', '.join(extra[:3])}" + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")]
              if extra else [])
    return f"has {len(teacher)} classes, {len(missing) + len(extra)} differ from DATA ({'; '.join(parts)})"


def check_classes(teachers: list[Teacher], data: list[str]) -> None:
    for teacher in teachers:
        differ = class_difference(teacher.labels, data)
        if differ:
            raise TeacherError(f"teacher {teacher.name} {differ}; a teacher must be trained on the same classes")


def cache_key(teachers: list[Teacher], fingerprint: str, items: list[str], classes: list[str]) -> dict:
    """What a cache was made from; `items` are the training photos relative to DATA, in the
    order of the training dataset."""
    return {"teachers": [t.digest for t in teachers], "photos": fingerprint, "items": list(items),
            "sizes": [t.size for t in teachers], "classes": list(classes)}


def cache_mismatch(saved: dict, key: dict) -> str | None:
    """Which of the cache's sources differs from this run's, or None when none does."""
    if saved.get("teachers") != key["teachers"]:
        return "other teacher weights (a --teacher was trained again, or another one is given)"
    if saved.get("photos") != key["photos"] or saved.get("items") != key["items"]:
        return "other photos (the data folder or its training split changed)"
    if saved.get("sizes") != key["sizes"]:
        return f"another input size ({saved.get('sizes')} px, now {key['sizes']} px)"
    if saved.get("classes") != key["classes"]:
        return "other classes"
    return None


def read_cache(path: Path, key: dict) -> torch.Tensor | None:
    """The cached logits (teachers, photos, views, classes); None when there is no cache file.
    Raises TeacherError naming what differs when the cache was made from anything else."""
    if not path.is_file():
        return None
    state = checkpoint.read_state(path, CACHE_FORMAT, TeacherError, "delete it to compute the teachers' outputs again")
    try:
        saved, logits = state["key"], state["logits"]
    except KeyError:
        raise TeacherError(f"{path} cannot be read (KeyError); delete it to compute the teachers' outputs "
                           "again") from None
    differs = cache_mismatch(saved, key)
    if differs:
        raise TeacherError(f"{path} was made from {differs}; delete it (or pass --fresh) to compute the "
                           "teachers' outputs again")
    return logits


def write_cache(path: Path, key: dict, logits: torch.Tensor) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CACHE_FORMAT, "key": key, "logits": logits.contiguous()}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buffer.getbuffer())


@contextlib.contextmanager
def rng_untouched():
    """The teachers' pass draws nothing from the run's generators (fastai's loaders seed
    themselves from Python's), so a run with a cache trains as one that computed it."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def teacher_logits(teachers: list[Teacher], items: list[Path], classes: list[str], chosen: str,
                   batch_size: int = 32, stream=sys.stderr) -> torch.Tensor:
    """Every teacher's logits for every view of every photo, in DATA's class order:
    (teachers, photos, views, classes)."""
    out = torch.empty(len(teachers), len(items), len(VIEWS), len(classes))
    started = time.perf_counter()
    with rng_untouched(), torch.inference_mode(), precision.autocast(chosen):
        for t, teacher in enumerate(teachers):
            order = torch.tensor([teacher.labels.index(c) for c in classes])
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                for view in (PLAIN, MIRRORED):
                    out[t, start:start + len(chunk), view] = teacher.logits(chunk, view == MIRRORED)[:, order]
            print(f"teacher {teacher.name}: {len(items)} photos x {len(VIEWS)} views at {teacher.size} px in "
                  f"{(time.perf_counter() - started) / 60:.1f} min", file=stream, flush=True)
            started = time.perf_counter()
    return out


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ensemble's softened probabilities: the mean over teachers (dim 0) of softmax(z / T)."""
    return F.softmax(logits.float() / temperature, dim=-1).mean(dim=0)


def kd_loss(student: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) at temperature T, averaged over the batch; T^2 keeps its
    gradients on the scale of the label loss's whatever T is (Hinton et al. 2015)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(log_q, targets, reduction="batchmean")


class DistillLoss:
    """(1 - weight) * base(logits, labels) + weight * kd_loss, for the batch whose teacher
    targets the Distill callback has set; the base loss alone when none are set (validation)."""

    def __init__(self, base, weight: float, temperature: float):
        if not 0 <= weight <= 1 or temperature <= 0:
            raise ValueError(f"need 0 <= weight <= 1 and temperature > 0, not {weight} and {temperature}")
        self.base, self.weight, self.temperature = base, weight, temperature
        self.targets: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        plain = self.base(logits, target)
        if self.targets is None or self.weight == 0:
            return plain
        soft = kd_loss(logits.view(-1, logits.shape[-1]), self.targets.to(logits.device), self.temperature)
        return (1 - self.weight) * plain + self.weight * soft

    def activation(self, x):
        return self.base.activation(x)

    def decodes(self, x):
        return self.base.decodes(x)


def record_order(loader) -> None:
    """Keep the item order `loader` draws each epoch in (its shuffled indices) on the loader."""
    if "epoch_order" in loader.__dict__:
        return
    own = loader.__dict__.get("get_idxs")
    draw = loader.get_idxs

    def recorded():
        idxs = draw()
        loader.epoch_order = list(idxs)
        return idxs

    loader.get_idxs, loader.epoch_order, loader.own_get_idxs = recorded, None, own


def forget_order(loader) -> None:
    """Undo record_order: the exported learner pickles its loaders, and must not need this module."""
    if "epoch_order" not in loader.__dict__:
        return
    own = loader.__dict__.pop("own_get_idxs")
    del loader.__dict__["epoch_order"]
    if own is None:
        del loader.__dict__["get_idxs"]
    else:
        loader.get_idxs = own


class Distill(Callback):
    """Puts each training batch's teacher targets into the DistillLoss, and mirrors a random
    half of the batch's images (with `mirror`) taking the mirrored view's targets for them.
    `loaders` are the training loaders the fit draws from (one per input size)."""

    order = 60  # before ChannelsLastAutocast, which lays the flipped batch out

    def __init__(self, loss: DistillLoss, targets: torch.Tensor, labels: torch.Tensor, mirror: bool, loaders: list):
        self.loss, self.targets, self.labels, self.mirror, self.loaders = loss, targets, labels, mirror, loaders

    def before_fit(self):
        for loader in self.loaders:
            record_order(loader)

    def after_fit(self):
        self.loss.targets = None
        for loader in self.loaders:
            forget_order(loader)

    def before_batch(self):
        self.loss.targets = None
        if not self.training:
            return
        order = self.dl.__dict__.get("epoch_order")
        if order is None:
            raise RuntimeError("the training loader does not record its item order (record_order)")
        start = self.iter * self.dl.bs
        rows = torch.tensor(order[start:start + len(self.yb[0])])
        if not torch.equal(self.labels[rows], self.yb[0].view(-1).long().cpu()):
            raise RuntimeError("the batch's labels differ from its photos' cached ones: the item order is lost")
        views = torch.zeros(len(rows), dtype=torch.long)
        if self.mirror:
            views = (torch.rand(len(rows)) < 0.5).long()
            flip = views.bool().to(self.xb[0].device)
            x = self.xb[0]
            self.learn.xb = (torch.where(flip.view(-1, 1, 1, 1), torch.flip(x, dims=[3]), x), *self.xb[1:])
        self.loss.targets = self.targets[rows, views]

    def after_loss(self):
        self.loss.targets = None


def relative(items: list[Path], root: Path) -> list[str]:
    return [os.path.relpath(p, root) for p in items]


def item_labels(items: list[Path], classes: list[str]) -> torch.Tensor:
    """Each photo's class index, from its folder as fastai's parent_label reads it."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[Path(p).parent.name] for p in items])
