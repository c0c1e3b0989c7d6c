"""The scoring pipeline, split as model servers do: preprocess, inference, postprocess."""

from __future__ import annotations

import time

import torch

from .artifact import Artifact
from .decode import decode
from .inference import Model
from .postprocess import top_k
from .preprocess import apply_steps, draft_size, image_to_tensor


class Scorer:
    def __init__(self, artifact: Artifact, model: Model, max_image_pixels: int):
        self.artifact = artifact
        self.model = model
        self.max_image_pixels = max_image_pixels
        self.draft_size = draft_size(artifact.steps)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Image bytes to the model's uint8 [3, H, W] input; raises ImageRejected for bad input."""
        image = decode(data, self.max_image_pixels, draft_size=self.draft_size)
        return image_to_tensor(apply_steps(image, self.artifact.steps, self.max_image_pixels))

    def inference(self, batch) -> torch.Tensor:
        """uint8 [N, 3, H, W] to probabilities; or, given a function that prepares one image as
        [1, 3, H, W], the probabilities of that image, prepared on the inference thread."""
        if callable(batch):
            return self.model.run(batch)
        return self.model(batch)

    def postprocess(self, probabilities: torch.Tensor, k: int) -> list[list[dict]]:
        return [top_k(row, self.artifact.labels, k) for row in probabilities]

    def score(self, data: bytes, k: int) -> dict:
        """One image through the whole pipeline, with timings in milliseconds."""
        spent = {}

        def prepare() -> torch.Tensor:
            started = time.perf_counter()
            pixels = self.preprocess(data).unsqueeze(0)
            spent["preprocess"] = time.perf_counter() - started
            return pixels

        t0 = time.perf_counter()
        # Decoded on the inference thread, just before its forward pass (see serve/inference.py).
        probabilities = self.inference(prepare)
        t2 = time.perf_counter()
        t1 = t0 + spent["preprocess"]
        predictions = self.postprocess(probabilities, k)[0]
        t3 = time.perf_counter()
        return {
            "predictions": predictions,
            "model": {"name": self.artifact.name, "sha256": self.artifact.sha256},
            "timings_ms": {
                "preprocess": round((t1 - t0) * 1000, 2),
                "inference": round((t2 - t1) * 1000, 2),
                "postprocess": round((t3 - t2) * 1000, 2),
            },
        }
