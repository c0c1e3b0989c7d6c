"""Training callbacks for the recipe's stages: a smaller input size for the early epochs, and a
running average of the weights over the late ones."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback


class SwitchSize(Callback):
    """Train the first `early_epochs` epochs of a fit on `early` dataloaders, the rest on `final`.

    Both must hold the same items, split and vocab, and the same number of batches, so one
    one-cycle schedule runs across the switch. Validation follows the switch too, so the
    accuracy printed for an early epoch is measured at the early size.
    """

    def __init__(self, early, final, early_epochs: int):
        self.early, self.final, self.early_epochs = early, final, early_epochs

    def before_fit(self):
        self.learn.dls = self.early if self.early_epochs else self.final

    def before_epoch(self):
        if self.epoch == self.early_epochs:
            self.learn.dls = self.final

    def after_fit(self):
        self.learn.dls = self.final


class WeightAverage(Callback):
    """An exponential moving average of the model's floating-point state (weights and BatchNorm
    statistics), updated after every training step from epoch `start_epoch` of the fit on.

    The average is kept aside during training; `apply()` copies it into the model, so the caller
    can measure the model before and after.
    """

    order = 70  # after the optimizer step of the batch it averages
    run_valid = False

    def __init__(self, decay: float, start_epoch: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be between 0 and 1, not {decay}")
        self.decay, self.start_epoch = decay, start_epoch
        self.average: dict[str, torch.Tensor] | None = None
        self.steps = 0

    def after_batch(self):
        if not self.training or self.epoch < self.start_epoch:
            return
        with torch.no_grad():
            state = self.learn.model.state_dict()
            if self.average is None:
                self.average = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
            else:
                for name, kept in self.average.items():
                    kept.lerp_(state[name], 1.0 - self.decay)
        self.steps += 1

    def apply(self, model: torch.nn.Module) -> bool:
        """Put the average into `model` (the learner's, which the callback no longer holds once the
        fit is over); False if no step was averaged."""
        if self.average is None:
            return False
        model.load_state_dict(self.average, strict=False)
        return True
