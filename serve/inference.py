"""Where the model runs: a batch of uint8 images in, probabilities out.

A small gate bounds how many forward passes run at once. Torch's intra-op threads are
per calling thread, so `workers` concurrent passes of `torch_threads` threads each should
not exceed the CPUs the process has; measured on two cores, two single-thread passes
beat one two-thread pass (87 against 67 images/s).
"""

from __future__ import annotations

import threading

import torch


class Model:
    def __init__(self, module: torch.jit.ScriptModule, workers: int):
        self.module = module
        self._gate = threading.BoundedSemaphore(max(1, workers))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] to float [N, classes] probabilities."""
        with self._gate, torch.inference_mode():
            return self.module(batch)

    def warm_up(self, height: int, width: int, rounds: int = 3) -> None:
        """Run the first passes now: TorchScript profiles and optimises during them."""
        probe = torch.zeros((1, 3, height, width), dtype=torch.uint8)
        for _ in range(rounds):
            self(probe)
