"""One loaded model with everything that scores with it, split as model servers do:
preprocess (serve/preprocess.py), inference (serve/inference.py), postprocess
(serve/postprocess.py). Routes hand a `Scorer` the request's images and format what comes back.
"""

from __future__ import annotations

import logging
import time

import torch

from .artifact import Artifact, first_line, load_artifact
from .errors import ArtifactError
from .config import Config
from .inference import Item, Model, PassObserver, Scored
from .manifest import Manifest
from .preprocess import Preprocessor

log = logging.getLogger("whatcar")


class Scorer:
    def __init__(self, artifact: Artifact, model: Model):
        self.artifact = artifact
        self.model = model

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def sha256(self) -> str:
        return self.artifact.sha256

    @property
    def labels(self) -> list[str]:
        return self.artifact.labels

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def preprocessor(self) -> Preprocessor:
        return self.model.preprocess

    def score(self, items: list[Item], all_or_nothing: bool = False) -> Scored:
        """Probabilities (or a rejection) for each encoded image or uint8 [3, H, W] tensor."""
        return self.model.score(items, all_or_nothing)

    def close(self) -> None:
        self.model.close()


def build_scorer(config: Config, observer: PassObserver | None = None) -> Scorer:
    """Verify, load and warm up the model in config.model_dir; raises ArtifactError with a
    one-line reason. `observer` hears about every forward pass."""
    torch.set_num_threads(config.torch_threads)
    artifact = load_artifact(config.model_dir)
    started = time.perf_counter()
    model = Model(artifact.module, Preprocessor(artifact.steps, config.max_image_pixels), artifact.input_size,
                  workers=config.inference_workers, torch_threads=config.torch_threads,
                  micro_batch=config.micro_batch, batch_wait=config.batch_wait_ms / 1000,
                  solo_threads=config.solo_threads, observer=observer)
    try:
        model.wait_ready()
    except Exception as exc:
        model.close()
        raise ArtifactError(f"the model in {config.model_dir} fails while warming up: {first_line(exc)}") from None
    log.info("loaded %s (%d classes, sha256 %s) in %.2fs, warmed up in %.2fs; %d inference workers of %d torch "
             "threads, batches of up to %d, %s", artifact.name, len(artifact.labels), artifact.sha256[:12],
             artifact.load_seconds, time.perf_counter() - started, config.inference_workers, config.torch_threads,
             config.micro_batch,
             f"{model.solo_threads} threads for a request alone" if model.solo_threads else "no solo passes")
    return Scorer(artifact, model)
