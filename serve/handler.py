"""One loaded model, and the one object that owns a request from its images to its answers.

`Handler.predict(items, options)` is what every caller uses: /predict, /v2, the batch command, the
Ray actors and the check photos every load scores. It hands the images to the inference threads
(serve/scheduler.py: decoding and preprocessing (serve/preprocess.py) and the forward pass run
there) and makes each output row an `Answer` (serve/postprocess.py). Routes only parse requests
and format answers. The model's facts (name, version, labels, classes, thresholds) are its
`artifact`'s; nothing here forwards them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import Artifact, load_artifact
from .config import Config
from .errors import ArtifactError, ImageRejected, first_line
from .postprocess import Makes, answer
from .preprocess import Preprocessor
from .runtime.loading import SHAPE_CHECKS, check_shapes, compiled_choice, warm_up_rounds
from .scheduler import InferenceThreads, Item, Model, PassObserver
from .versions import ModelFolder, VersionError

log = logging.getLogger("whatcar")


@dataclass(frozen=True)
class Options:
    """How a request wants its answers: `top_k` classes ranked, the model-level threshold
    replaced by `min_probability` when given, and with `all_or_nothing` one rejected image keeps
    the others out of the forward pass (the request fails as a whole anyway)."""

    top_k: int = 5
    min_probability: float | None = None
    all_or_nothing: bool = False


@dataclass
class Prediction:
    """One request's answers, one per image (or the ImageRejected that stopped it), and where
    its time went, in seconds."""

    answers: list  # Answer | ImageRejected, in the images' order
    queue: float = 0.0       # from hand-over until an inference thread took it
    preprocess: float = 0.0  # decoding and preprocessing its images, on the inference thread
    forward: float = 0.0     # the forward pass it was part of
    batch_size: int = 0      # images in that forward pass (other requests' included)
    postprocess: float = 0.0  # making the answers from the output rows
    ran: str = ""            # what ran that pass: a compiled shape such as "b1t1", or "torchscript"

    @property
    def rejected(self) -> ImageRejected | None:
        """The first rejected image's error, if any."""
        return next((a for a in self.answers if isinstance(a, ImageRejected)), None)


class Handler:
    def __init__(self, artifact: Artifact, model: Model):
        self.artifact = artifact
        self.model = model
        classes = artifact.manifest.classes
        self.makes = Makes.of(classes) if classes else None

    def predict(self, items: list[Item], options: Options = Options()) -> Prediction:
        """An answer for each encoded image or uint8 [3, H, W] tensor of one request."""
        scored = self.model.score(items, options.all_or_nothing)
        started = time.perf_counter()
        artifact = self.artifact
        answers = [row if isinstance(row, ImageRejected) or row is None else
                   answer(row, artifact.labels, artifact.extra_outputs, artifact.acceptance, options.top_k,
                          options.min_probability, self.makes)
                   for row in scored.rows]
        return Prediction(answers, scored.queue, scored.preprocess, scored.forward, scored.batch_size,
                          time.perf_counter() - started, scored.ran)

    def close(self) -> None:
        """Take the model off the inference threads and let go of its weights at once, rather
        than whenever the last reference to this handler goes, so their memory can be returned now."""
        self.model.close()
        self.model.runner = None
        self.artifact.close()


def verify_checks(handler: Handler, required: bool, requested: str = "auto") -> int:
    """Score the artifact's check photos, one request each as clients send them, and hold each
    top-1 to the one recorded at export; returns how many were checked. Raises ArtifactError on
    a disagreement, or when `required` and the manifest lists none. Then every compiled shape
    gets them too: one that disagrees leaves its passes to the next runtime (check_shapes)."""
    folder, checks = handler.artifact.folder, handler.artifact.manifest.checks
    if required and not checks:
        raise ArtifactError(f"{folder / 'manifest.json'} lists no check photos to prove the model with; "
                            "re-export it with this version of whatcar")
    photos = []
    for check in checks:
        path = handler.artifact.manifest.verified(folder, check.file, check.sha256, "check")
        photos.append(path.read_bytes())
        prediction = handler.predict([photos[-1]], Options(top_k=1))
        if prediction.rejected is not None:
            raise ArtifactError(f"check photo {path} cannot be scored: {prediction.rejected.description}")
        got = prediction.answers[0].ranked[0].label
        if got != check.top1:
            raise ArtifactError(f"check photo {path} is scored {got!r} but the export recorded {check.top1!r}: "
                                "this is not the model that was exported, or it runs differently here")
    artifact = handler.artifact
    if checks:
        pixels = torch.stack([handler.model.preprocess(photo) for photo in photos[:SHAPE_CHECKS]])
        expected = [artifact.labels.index(check.top1) for check in checks[:SHAPE_CHECKS]]
        passes = handler.model.threads.plan.passes()
        if check_shapes(artifact.runner, pixels, expected, len(artifact.labels), requested, passes):
            artifact.runtime = compiled_choice(artifact.runner, passes)
    return len(checks)


def load_handler(folder: Path, version: str, config: Config, observer: PassObserver | None = None,
                 require_checks: bool = False, threads: InferenceThreads | None = None) -> Handler:
    """Verify and load the artifact in `folder`, warm it up on the inference threads, and score
    its check photos; raises ArtifactError with a one-line reason (and leaves nothing running).
    `threads` are the ones the model before it runs on (by default new ones, from `config`);
    `observer` hears about every forward pass.

    The warm-up and the check photos run through the runtime that will serve. With
    --runtime auto, a compiled package that fails either is replaced by TorchScript, and the
    reason logged; TorchScript failing them fails the load."""
    torch.set_num_threads(config.torch_threads)
    threads = threads if threads is not None else inference_threads(config)
    artifact = load_artifact(folder, runtime=config.runtime, plan=threads.plan, version=version)
    preprocessor = Preprocessor(artifact.steps, config.max_image_pixels)
    while True:
        started = time.perf_counter()
        rounds = warm_up_rounds(artifact.runner, threads.plan.passes())
        model = Model(artifact.runner, preprocessor, artifact.input_size, threads, observer=observer,
                      warm_up_rounds=rounds)
        handler = Handler(artifact, model)
        try:
            try:
                model.wait_ready()
            except Exception as exc:  # noqa: BLE001 - any failure while warming up is a bad model
                raise ArtifactError(f"the model in {folder} fails while warming up: {first_line(exc)}") from None
            warmed = time.perf_counter()
            checked = verify_checks(handler, require_checks, config.runtime)
            break
        except ArtifactError as exc:
            model.close()
            try:
                if artifact.runtime.name != "compiled":
                    raise
                artifact.fall_back(config.runtime, f"it failed once loaded: {exc}")
            except ArtifactError:
                artifact.close()
                raise
        except BaseException:
            model.close()
            artifact.close()
            raise
    # The one line that says which runtime serves and why; a warning when a package was passed over.
    passed_over = artifact.runtime.name == "torchscript" and config.runtime == "auto" and \
        bool(artifact.manifest.compiled)
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
    return handler


def inference_threads(config: Config) -> InferenceThreads:
    """Inference threads as `config` sets them up; they start when the first model attaches."""
    return InferenceThreads(workers=config.inference_workers, torch_threads=config.torch_threads,
                            micro_batch=config.micro_batch, batch_wait=config.batch_wait_ms / 1000,
                            solo_threads=config.solo_threads)


def build_handler(config: Config, observer: PassObserver | None = None) -> Handler:
    """The handler for the version config.model_dir names as current; raises ArtifactError."""
    models = ModelFolder(config.model_dir)
    try:
        version = models.current()
    except VersionError as exc:
        raise ArtifactError(str(exc)) from None
    return load_handler(models.folder(version), version, config, observer)
