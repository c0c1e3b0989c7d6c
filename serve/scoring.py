"""One loaded model with everything that scores with it, split as model servers do:
preprocess (serve/preprocess.py), inference (serve/inference.py), postprocess
(serve/postprocess.py). Routes hand a `Scorer` the request's images and format what comes back.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .artifact import Artifact, first_line, load_artifact
from .errors import ArtifactError
from .config import Config
from .inference import InferenceThreads, Item, Model, PassObserver, Scored
from .manifest import Acceptance, Manifest
from .postprocess import Answer, Output, answer, split_row
from .preprocess import Preprocessor
from .runtime import RuntimeChoice
from .versions import ModelFolder, VersionError

log = logging.getLogger("whatcar")


class Scorer:
    def __init__(self, artifact: Artifact, model: Model, version: str = "1"):
        self.artifact = artifact
        self.model = model
        self.version = version

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
    def acceptance(self) -> Acceptance | None:
        """When the top answer counts as an answer (None: the export recorded no thresholds)."""
        return self.artifact.acceptance

    @property
    def runtime(self) -> RuntimeChoice:
        return self.artifact.runtime

    @property
    def preprocessor(self) -> Preprocessor:
        return self.model.preprocess

    def score(self, items: list[Item], all_or_nothing: bool = False) -> Scored:
        """The module's output row (or a rejection) for each encoded image or uint8 [3, H, W] tensor."""
        return self.model.score(items, all_or_nothing)

    def read(self, row: torch.Tensor) -> Output:
        """One image's output row, split into what its columns mean."""
        return split_row(row, len(self.labels), self.artifact.extra_outputs)

    def answer(self, row: torch.Tensor, k: int, min_probability: float | None = None) -> Answer:
        """One image's output row as the answer every route formats (serve/postprocess.py)."""
        return answer(row, self.labels, self.artifact.extra_outputs, self.acceptance, k, min_probability)

    def close(self) -> None:
        """Take the model off the inference threads and let go of its weights at once, rather
        than whenever the last reference to this scorer goes, so their memory can be returned now."""
        self.model.close()
        self.model.runner = None
        self.artifact.close()


def verify_checks(scorer: Scorer, required: bool) -> int:
    """Score the artifact's check photos, one request each as clients send them, and hold each
    top-1 to the one recorded at export; returns how many were checked. Raises ArtifactError on
    a disagreement, or when `required` and the manifest lists none."""
    folder, checks = scorer.artifact.folder, scorer.manifest.checks
    if required and not checks:
        raise ArtifactError(f"{folder / 'manifest.json'} lists no check photos to prove the model with; "
                            "re-export it with this version of whatcar")
    for check in checks:
        path = scorer.manifest.verified(folder, check.file, check.sha256, "check")
        scored = scorer.score([path.read_bytes()])
        if scored.rejected is not None:
            raise ArtifactError(f"check photo {path} cannot be scored: {scored.rejected.description}")
        got = scorer.labels[int(scorer.read(scored.rows[0]).probabilities.argmax())]
        if got != check.top1:
            raise ArtifactError(f"check photo {path} is scored {got!r} but the export recorded {check.top1!r}: "
                                "this is not the model that was exported, or it runs differently here")
    return len(checks)


def load_scorer(folder: Path, version: str, config: Config, observer: PassObserver | None = None,
                require_checks: bool = False, threads: InferenceThreads | None = None) -> Scorer:
    """Verify and load the artifact in `folder`, warm it up on the inference threads, and score
    its check photos; raises ArtifactError with a one-line reason (and leaves nothing running).
    `threads` are the ones the model before it runs on (by default new ones, from `config`);
    `observer` hears about every forward pass.

    The warm-up and the check photos run through the runtime that will serve. With
    --runtime auto, a compiled package that fails either is replaced by TorchScript, and the
    reason logged; TorchScript failing them fails the load."""
    torch.set_num_threads(config.torch_threads)
    threads = threads if threads is not None else inference_threads(config)
    artifact = load_artifact(folder, runtime=config.runtime, runners=threads.workers)
    preprocessor = Preprocessor(artifact.steps, config.max_image_pixels)
    while True:
        started = time.perf_counter()
        # TorchScript's profiling executor settles on the second run of a shape; compiled code has
        # nothing to profile, and its second pass already runs at full speed (measured per thread
        # and batch size), so one warm-up pass each is enough for it.
        rounds = 1 if artifact.runtime.name == "compiled" else 2
        model = Model(artifact.runner, preprocessor, artifact.input_size, threads, observer=observer,
                      warm_up_rounds=rounds)
        scorer = Scorer(artifact, model, version)
        try:
            try:
                model.wait_ready()
            except Exception as exc:
                raise ArtifactError(f"the model in {folder} fails while warming up: {first_line(exc)}") from None
            warmed = time.perf_counter()
            checked = verify_checks(scorer, require_checks)
            break
        except ArtifactError as exc:
            model.close()
            if artifact.runtime.name != "compiled" or config.runtime == "compiled":
                artifact.close()
                raise
            artifact.fall_back(f"it failed once loaded: {exc}")
        except BaseException:
            model.close()
            artifact.close()
            raise
    # The one line that says which runtime serves and why; a warning when a package was passed over.
    passed_over = artifact.runtime.name == "torchscript" and config.runtime == "auto" and \
        artifact.manifest.compiled is not None
    log.log(logging.WARNING if passed_over else logging.INFO, "%s version %s runs on %s: %s", artifact.name, version,
            artifact.runtime.name, artifact.runtime.reason)
    log.info("loaded %s version %s (%d classes, sha256 %s) on %s in %.2fs, warmed up in %.2fs, "
             "%d check photos agree (%.2fs); %d inference workers of %d torch threads, batches of up to %d, %s",
             artifact.name, version, len(artifact.labels), artifact.sha256[:12], artifact.runtime.name,
             artifact.load_seconds, warmed - started, checked, time.perf_counter() - warmed,
             config.inference_workers, config.torch_threads, config.micro_batch,
             f"{model.solo_threads} threads for a request alone" if model.solo_threads else "no solo passes")
    if not checked:
        log.warning("%s lists no check photos: the loaded model was not compared with the exported one", folder)
    return scorer


def inference_threads(config: Config) -> InferenceThreads:
    """Inference threads as `config` sets them up; they start when the first model attaches."""
    return InferenceThreads(workers=config.inference_workers, torch_threads=config.torch_threads,
                            micro_batch=config.micro_batch, batch_wait=config.batch_wait_ms / 1000,
                            solo_threads=config.solo_threads)


def build_scorer(config: Config, observer: PassObserver | None = None) -> Scorer:
    """The scorer for the version config.model_dir names as current; raises ArtifactError."""
    models = ModelFolder(config.model_dir)
    try:
        version = models.current()
    except VersionError as exc:
        raise ArtifactError(str(exc)) from None
    return load_scorer(models.folder(version), version, config, observer)
