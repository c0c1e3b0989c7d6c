"""Checkpoints of a training run: one after every epoch, so that a run stopped at any point goes on
from the last finished epoch and ends with the weights an uninterrupted run would have had.

A checkpoint holds the weights, the optimiser's state, where the run is in its schedule (the phase
and the epoch within it), every random number generator the epochs draw from (Python's, NumPy's,
torch's and each dataloader's own shuffling generator) and, with --ema, the running average. It
also holds the run's arguments, a fingerprint of the data folder and, for a run that goes on from an
exported learner (--resume), a digest of that learner's weights, so that a checkpoint is only ever
continued by the run that made it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastcore.foundation import L

from ops import atomic

FILE = "checkpoint.pth"
FORMAT = 1
HEAD, BODY = "head", "body"
# Arguments that do not change what is trained: where it goes, how it is shown, when to pause.
NOT_RECIPE = ("out", "quiet", "stop_after", "fresh")
# What a checkpoint written before an argument existed was made with (it trained in fp32). Without
# these, every new argument would refuse every older checkpoint.
BEFORE_ARGUMENT = {"precision": "fp32", "run_seed": None}
DISTILLATION = ("teacher", "distill", "temperature")


class CheckpointMismatch(Exception):
    """The checkpoint was made by another run; the message says what differs."""


def read_state(path: Path, expected_format: int, error: type[Exception], remedy: str) -> dict:
    """A state file this code wrote (a checkpoint, a teacher cache), or `error` saying why it
    cannot be used and `remedy`. Plain tensors, numbers and strings only: the weights-only loader
    refuses anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file fails in many ways
        raise error(f"{path} cannot be read ({type(exc).__name__}); {remedy}") from None
    if not isinstance(state, dict) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, dict) else None
        raise error(f"{path} has format {found}, this code writes {expected_format}; {remedy}")
    return state


class StopRun(Exception):
    """--stop-after was reached: the checkpoint is saved and the run ends here."""

    def __init__(self, epochs_done: int):
        super().__init__(epochs_done)
        # fastai rewrites the args of an exception raised in a callback; an attribute survives.
        self.epochs_done = epochs_done


def recipe(args) -> dict:
    """The arguments that decide the weights, as plain values. Without a teacher, the
    distillation settings decide nothing and are left out, so that the recipe of such a run is
    the one it had before they existed."""
    leave_out = NOT_RECIPE if getattr(args, "teacher", None) else NOT_RECIPE + DISTILLATION
    return {k: _plain_value(v) for k, v in sorted(vars(args).items()) if k not in leave_out}


def _plain_value(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    return value


def data_fingerprint(items: list[Path], root: Path) -> str:
    """sha256 over every photo's path in the data folder and its size: a file added, removed,
    renamed or rewritten to another size changes it. Reading every byte would cost seconds on
    each start for little more."""
    digest = hashlib.sha256()
    for item in sorted(os.path.relpath(p, root) for p in items):
        digest.update(f"{item}\0{os.path.getsize(os.path.join(root, item))}\n".encode())
    return digest.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's weights, names and shapes: the learner a --resume run starts from.
    Its path would not tell a learner trained again since (`make train` writes its first run's to
    one place every time), and its file's bytes would differ between two exports of the same
    weights if the pickle did."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)  # channels-last or not, one byte order
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stored_recipe(folder: Path) -> dict | None:
    """The recipe the checkpoint in `folder` was made with (arguments it predates at their old
    values), or None when there is no readable one; Checkpoints.read says why it cannot go on."""
    try:
        state = torch.load(folder / FILE, map_location="cpu", weights_only=True)
        return {**BEFORE_ARGUMENT, **state["recipe"]}
    except Exception:  # noqa: BLE001 - missing, torn or foreign: read() reports it
        return None


@dataclass
class Position:
    """The last finished epoch: `epoch` (counted from 0) of `phase` (HEAD, then BODY)."""

    phase: str
    epoch: int

    def start_of(self, phase: str, epochs_in_phase: int) -> int | None:
        """The epoch `phase` goes on from, or None when it has nothing left to run."""
        if phase == HEAD and self.phase == BODY:
            return None
        if phase == BODY and self.phase == HEAD:
            return 0
        following = self.epoch + 1
        return following if following < epochs_in_phase else None


def _plain(value):
    """The optimiser's state in plain containers and numbers: the weights-only loader takes no
    NumPy scalars and no fastcore lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, L):
        return [_plain(v) for v in value]
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def rng_state(loaders: list) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "loaders": [loader.rng.getstate() for loader in loaders]}


def restore_rng(state: dict, loaders: list) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for loader, saved in zip(loaders, state["loaders"], strict=True):
        loader.rng.setstate(_tuples(saved))


def _tuples(state):
    """random.setstate wants the tuples getstate gave; a saved state may come back with lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


@dataclass
class Saved:
    """A checkpoint read back: where the run was, and what to restore."""

    position: Position
    model: dict
    optimizer: dict
    rng: dict
    average: dict | None
    average_steps: int
    seconds: dict

    def load_into(self, learn, loaders: list, average=None) -> None:
        """Weights and optimiser state into `learn` (whose optimiser must already be frozen as the
        phase being continued was), and the generators and running average back as they were."""
        learn.model.load_state_dict(self.model)
        learn.opt.load_state_dict(self.optimizer)
        if average is not None:
            average.average = self.average
            average.steps = self.average_steps
        restore_rng(self.rng, loaders)


class Checkpoints:
    """The checkpoint file of one run folder."""

    def __init__(self, folder: Path, recipe: dict, data: str, start: str | None = None,
                 teachers: list[str] | None = None):
        self.path = folder / FILE
        # start: weights_digest of the learner the run goes on from, None for a run from scratch.
        # teachers: weights_digest of each --teacher: the same paths may hold retrained weights.
        self.recipe, self.data, self.start, self.teachers = recipe, data, start, list(teachers or [])

    def inputs(self) -> dict:
        """What decides this run's weights, as the learner's sidecar keeps it (`finished_as`)."""
        return {"recipe": self.recipe, "data": self.data, "start": self.start, "teachers": self.teachers}

    def read(self) -> Saved | None:
        """The run's last checkpoint; None if there is none. Raises CheckpointMismatch when it
        belongs to another run, naming what differs."""
        if not self.path.is_file():
            return None
        state = read_state(self.path, FORMAT, CheckpointMismatch, "pass --fresh to start the run over")
        made = {**BEFORE_ARGUMENT, **state["recipe"]}
        differs = [f"--{k.replace('_', '-')} {made.get(k)!r} (now {v!r})"
                   for k, v in self.recipe.items() if made.get(k) != v]
        differs += [f"--{k.replace('_', '-')} {v!r} (now unset)" for k, v in state["recipe"].items()
                    if k not in self.recipe]
        if state["data"] != self.data:
            differs.append("the photos in the data folder (files added, removed or changed)")
        if state.get("start") != self.start:
            differs.append("other weights in the learner --resume names (it was trained again since)")
        if state.get("teachers", []) != self.teachers:
            differs.append("other teacher weights (a --teacher was trained again since)")
        if differs:
            raise CheckpointMismatch(f"{self.path} is from another run: it was made with " + ", ".join(differs)
                                     + "; run with the same arguments and data to go on, or pass --fresh to "
                                     "start over")
        return Saved(Position(state["phase"], state["epoch"]), state["model"], state["optimizer"], state["rng"],
                     state.get("average"), state.get("average_steps", 0), state.get("seconds", {}))

    def write(self, learn, position: Position, loaders: list, average=None, seconds: dict | None = None) -> None:
        state = {
            "format": FORMAT, "recipe": self.recipe, "data": self.data, "start": self.start,
            "teachers": self.teachers,
            "phase": position.phase, "epoch": position.epoch,
            "model": learn.model.state_dict(), "optimizer": _plain(learn.opt.state_dict()),
            "rng": rng_state(loaders),
            "average": average.average if average is not None else None,
            "average_steps": average.steps if average is not None else 0,
            "seconds": seconds or {},
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        # A run killed while writing keeps the previous checkpoint: the new one replaces it whole.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(self.path, buffer.getbuffer())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def finished_as(sidecar: dict, inputs: dict, any_precision: bool) -> bool:
    """Whether the learner whose sidecar this is was trained from exactly `inputs`
    (Checkpoints.inputs): then the run need not run again. With `any_precision` (--precision
    auto, which resolves per host) the precision it trained in does not count."""
    saved = sidecar.get("inputs")
    if not isinstance(saved, dict):
        return False  # written before the sidecar kept its inputs: nothing says what it came from
    now = json.loads(json.dumps(inputs))  # as the sidecar stores it: tuples are lists
    if any_precision:
        saved = {**saved, "recipe": {k: v for k, v in (saved.get("recipe") or {}).items() if k != "precision"}}
        now["recipe"].pop("precision", None)
    return saved == now


class SaveEachEpoch(Callback):
    """Writes a checkpoint after every epoch of one phase's fit that actually ran (fastai still
    calls after_epoch for the epochs a resumed fit skips), after `clock` has reported it, then
    stops the run if --stop-after is reached."""

    order = 90  # after the optimizer, the recorder and the running average are done with the epoch

    def __init__(self, checkpoints: Checkpoints, phase: str, start_epoch: int, loaders: list, clock,
                 average=None, stop_after: int | None = None, epochs_before: int = 0):
        self.checkpoints, self.phase, self.start_epoch, self.loaders = checkpoints, phase, start_epoch, loaders
        self.clock, self.average, self.stop_after, self.epochs_before = clock, average, stop_after, epochs_before

    def before_epoch(self):
        if self.epoch >= self.start_epoch:
            self.clock.epoch_started()

    def after_epoch(self):
        if self.epoch < self.start_epoch:
            return
        values = self.learn.recorder.values
        accuracy = float(values[-1][-1]) if values and values[-1] else None
        seconds = self.clock.epoch_done(self.phase, self.epoch, accuracy)
        self.checkpoints.write(self.learn, Position(self.phase, self.epoch), self.loaders, self.average, seconds)
        done = self.epochs_before + self.epoch + 1
        if self.stop_after is not None and done >= self.stop_after:
            raise StopRun(done)
