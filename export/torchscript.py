"""Wrapping a trained model into the module the server runs, and tracing it.

The module takes what the server's preprocessing produces, uint8 RGB [N, 3, H, W], and does
fastai's validation batch work itself: scale by 1/255, normalise, run the model and apply
the loss function's activation. So the server needs torch alone.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class ServedModel(nn.Module):
    def __init__(self, model: nn.Module, div: float, mean: list[float] | None, std: list[float] | None):
        super().__init__()
        self.model = model
        self.div = div
        channels = 3
        self.register_buffer("mean", torch.tensor(mean if mean else [0.0] * channels).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std if std else [1.0] * channels).view(1, channels, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Same operations in the same order as fastai's IntToFloatTensor and Normalize.
        x = images.float().div(self.div)
        x = (x - self.mean) / self.std
        return torch.softmax(self.model(x), dim=-1)


def plain(model: nn.Module) -> nn.Module:
    """The model with fastai's tensor subclasses kept out of the trace."""
    return model.float().eval()


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
            got, want = frozen(batch), served(batch)
            if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5):
                raise RuntimeError(f"traced module disagrees with the model on a batch of {n}")
    return frozen
