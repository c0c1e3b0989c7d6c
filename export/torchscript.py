"""Wrapping a trained model into the module the server runs, and tracing it.

The module takes what the server's preprocessing produces, uint8 RGB [N, 3, H, W], and does
fastai's validation batch work itself: scale by 1/255, normalise, run the model and apply the
softmax, of the logits divided by the calibration temperature. So the server needs torch alone.

With class directions (export/calibration.py's class_directions) it also returns each photo's
familiarity: the cosine of its pooled features to the nearest class's training photos, which
tells car photos of the kind the model knows from everything else. It is computed from the
features the head pools anyway, so it costs a few thousand multiply-adds per image.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .calibration import familiarity


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """(body, pooling, rest of the head) of a fastai vision model, or None for another shape.

    fastai's head starts by pooling and flattening the body's feature maps (AdaptiveConcatPool2d
    or a plain pool, then Flatten); what comes out of that is the photo's feature vector.
    """
    if not (isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[1], nn.Sequential)):
        return None
    head = model[1]
    flatten = next((i for i, layer in enumerate(head) if type(layer).__name__ == "Flatten"), None)
    if flatten is None:
        return None
    return model[0], head[:flatten + 1], head[flatten + 1:]


class ServedModel(nn.Module):
    """`model` wrapped to take uint8 pixels and answer probabilities (and familiarity).

    With `also` (more models of the same classes), the answer is their ensemble: every model sees
    the same input, the logits become the mean of their log-probabilities (the log of the
    normalised geometric mean of their probabilities, so one temperature calibrates the whole) and
    the features are theirs side by side.
    """

    def __init__(self, model: nn.Module, div: float, mean: list[float] | None, std: list[float] | None,
                 temperature: float = 1.0, directions: torch.Tensor | None = None, also: list[nn.Module] = ()):
        super().__init__()
        parts = split_model(model)
        if directions is not None and parts is None:
            raise ValueError("familiarity needs a fastai vision model (a body and a head that pools and flattens)")
        self.body, self.pool, self.rest = parts if parts is not None else (model, nn.Identity(), nn.Identity())
        self.ensemble = bool(also)
        if self.ensemble:
            others = [split_model(other) for other in also]
            if parts is None or None in others:
                raise ValueError("ensembles need fastai vision models (a body and a head that pools and flattens)")
            # Registered only for an ensemble, so a single model keeps the layout it always had.
            self.also = nn.ModuleList(nn.ModuleList(other) for other in others)
        self.div = div
        self.temperature = float(temperature)
        channels = 3
        self.register_buffer("mean", torch.tensor(mean if mean else [0.0] * channels).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std if std else [1.0] * channels).view(1, channels, 1, 1))
        self.familiar = directions is not None
        self.register_buffer("directions", directions.float() if directions is not None else torch.zeros(0))

    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Same operations in the same order as fastai's IntToFloatTensor and Normalize.
        x = images.float().div(self.div)
        x = (x - self.mean) / self.std
        features = self.pool(self.body(x))
        logits = self.rest(features)
        if not self.ensemble:
            return logits, features
        scores, pooled = [torch.log_softmax(logits, dim=-1)], [features]
        for body, pool, rest in self.also:
            features = pool(body(x))
            scores.append(torch.log_softmax(rest(features), dim=-1))
            pooled.append(features)
        return torch.stack(scores).mean(dim=0), torch.cat(pooled, dim=-1)

    def forward(self, images: torch.Tensor):
        logits, features = self.logits_and_features(images)
        probabilities = torch.softmax(logits / self.temperature, dim=-1)
        if not self.familiar:
            return probabilities
        return probabilities, familiarity(features, self.directions)


def probabilities_of(outputs) -> torch.Tensor:
    """The probabilities among a served module's outputs (all of them, for a module of format 1)."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


def plain(model: nn.Module) -> nn.Module:
    """The model with fastai's tensor subclasses kept out of the trace."""
    return model.float().eval()


def outputs_close(got, want, atol: float) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, atol=atol)
    return len(got) == len(want) and all(outputs_close(g, w, atol) for g, w in zip(got, want))


def trace_and_freeze(served: ServedModel, height: int, width: int) -> torch.jit.ScriptModule:
    """Trace with a batch of two, freeze, and check other batch sizes give the same rows.

    Not passed through optimize_for_inference: its saved output does not load again; the
    server optimises after loading instead. torch 2.14 warns that trace and freeze are
    deprecated in favour of torch.export; they still work and load in older torch.
    """
    served = served.eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=generator)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(served, example, check_trace=False)
        frozen = torch.jit.freeze(traced)
        for n in (1, 3, 5):
            batch = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=generator)
            if not outputs_close(frozen(batch), served(batch), atol=1e-5):
                raise RuntimeError(f"traced module disagrees with the model on a batch of {n}")
    return frozen
