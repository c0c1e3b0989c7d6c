"""The HTTP face of whatcar: `create_app(config, serving, state, metrics)` builds the Falcon app;
`get_app()` builds one from WHATCAR_* variables for any WSGI server."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import falcon
from prometheus_client import CollectorRegistry

from . import repository, v2
from .config import Config, configure_logging, load_config
from .decode import ACCEPTED_MEDIA_TYPES
from .errors import ImageRejected, UnsupportedImageType
from .handler import Options, build_handler
from .live_model import LiveModel, NotServing
from .metrics import Metrics, MetricsResource, RequestMetrics
from .openapi import OpenApiResource
from .postprocess import clamp_k
from .upload import read_upload

log = logging.getLogger("whatcar")
access_log = logging.getLogger("whatcar.access")

STATIC = Path(__file__).parent / "static"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


class State:
    """Readiness, shared by the server (which flips it) and the probes (which report it)."""

    def __init__(self, ready: bool = False):
        self._ready = threading.Event()
        if ready:
            self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def set_ready(self, ready: bool) -> None:
        (self._ready.set if ready else self._ready.clear)()


def reject(exc: ImageRejected) -> falcon.HTTPError:
    headers = None
    if isinstance(exc, UnsupportedImageType):
        headers = {"Accept-Post": ", ".join(ACCEPTED_MEDIA_TYPES)}
    return falcon.HTTPError(exc.status, title=exc.status.split(" ", 1)[1], description=exc.description,
                            code=exc.reason, headers=headers)


def not_serving(what: str = "model is not ready") -> falcon.HTTPServiceUnavailable:
    return falcon.HTTPServiceUnavailable(description=what, retry_after=1)


@contextlib.contextmanager
def handler_for(serving: LiveModel, state: State):
    """The live handler for one request, kept alive until the request is done; 503 when none."""
    if not state.ready:
        raise not_serving()
    try:
        with serving.lease() as handler:
            yield handler
    except NotServing:
        raise not_serving("no model is loaded") from None


class PredictResource:
    def __init__(self, serving: LiveModel, config: Config, state: State, metrics: Metrics):
        self.serving, self.config, self.state, self.metrics = serving, config, state, metrics

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        with handler_for(self.serving, self.state) as handler:
            artifact = handler.artifact
            classes = len(artifact.labels)
            k = req.get_param_as_int("top_k", min_value=1, max_value=classes,
                                     default=clamp_k(self.config.top_k, classes))
            min_probability = req.get_param_as_float("min_probability", min_value=0.0, max_value=1.0)
            started = time.perf_counter()
            try:
                prediction = handler.predict([read_upload(req, self.config.max_upload_bytes)],
                                             Options(k, min_probability))
                if prediction.rejected is not None:
                    raise prediction.rejected
            except ImageRejected as exc:
                self.metrics.observe_rejection(exc)
                raise reject(exc) from None
            self.metrics.observe_queue(prediction.queue)
            answer = prediction.answers[0]
            finished = time.perf_counter()
            verdict = answer.verdict
            make = answer.make_answer()
            resp.media = {
                "predictions": answer.predictions(),
                **({"make": make} if make is not None else {}),
                "accepted": verdict.accepted,
                "accepted_level": verdict.level,
                **({"reason": verdict.reason} if verdict.reason else {}),
                "model": {"name": artifact.name, "version": artifact.version, "sha256": artifact.sha256},
                "timings_ms": {
                    "preprocess": ms(prediction.preprocess),
                    "queue": ms(prediction.queue),
                    "inference": ms(prediction.forward),
                    "postprocess": ms(prediction.postprocess),
                    "total": ms(finished - started),
                },
                "forward_pass": {"ran": prediction.ran, "images": prediction.batch_size},
            }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class HealthResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "alive"}


class ReadyResource:
    def __init__(self, serving: LiveModel, state: State):
        self.serving, self.state = serving, state

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self.state.ready or self.serving.current is None:
            resp.status = falcon.HTTP_503
            resp.media = {"status": "not ready"}
            return
        resp.media = {"status": "ready"}


class MetadataResource:
    def __init__(self, serving: LiveModel):
        self.serving = serving

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        handler = self.serving.current
        reload = self.serving.describe()
        if handler is None:
            resp.status = falcon.HTTP_503
            resp.media = {"title": "Service Unavailable", "description": "no model is loaded", "reload": reload}
            return
        artifact = handler.artifact
        cars = artifact.manifest.classes
        resp.media = {"name": artifact.name, "version": artifact.version, "sha256": artifact.sha256,
                      "classes": artifact.labels, "num_classes": len(artifact.labels),
                      # Make, model, body style and year of each class, parsed at export (null when not).
                      "class_fields": [c.as_dict() for c in cars] if cars else None,
                      "makes": handler.makes.names if handler.makes else None,
                      **artifact.manifest.describe(), "runtime": artifact.runtime.as_dict(),
                      "acceptance": describe_acceptance(artifact), "reload": reload}


def describe_acceptance(artifact) -> dict:
    """The thresholds /predict judges by, and the figures the export measured them with."""
    acceptance = artifact.acceptance
    if acceptance is None:
        return {"enabled": False,
                "reason": "this export recorded no acceptance threshold (exported before whatcar did); answers are "
                          "not judged unless a request gives ?min_probability="}
    recorded = artifact.manifest.data["acceptance"]
    return {"enabled": True, "min_probability": acceptance.min_probability,
            "min_familiarity": acceptance.min_familiarity, "min_make_probability": acceptance.min_make_probability,
            **{key: recorded[key] for key in ("rule", "figures") if key in recorded}}


class StaticResource:
    """One file of the upload page, read once at start-up; no path comes from the request."""

    def __init__(self, name: str, content_type: str):
        self.body = (STATIC / name).read_bytes()
        self.content_type = content_type

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self.body
        resp.content_type = self.content_type
        resp.set_header("Content-Security-Policy", PAGE_CSP)
        resp.set_header("Cache-Control", "no-cache")


class AccessLog:
    """One line per request to stderr, plus headers every response should carry."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded: bool) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        elapsed = (time.perf_counter() - getattr(req.context, "started", time.perf_counter())) * 1000
        access_log.info("%s %s %s %.1fms", req.method, req.path, resp.status_code, elapsed)


def handle_unexpected(req, resp, exc, params) -> None:
    """A bug on our side: log it with its traceback, answer JSON without one."""
    if isinstance(exc, falcon.HTTPError):
        raise exc
    log.exception("unhandled error on %s %s", req.method, req.path)
    raise falcon.HTTPInternalServerError(description="the server hit an internal error; it has been logged")


def create_app(config: Config, serving: LiveModel, state: State, metrics: Metrics | None = None) -> falcon.App:
    """The app, counting in `metrics` (fresh ones, in a registry of their own, when not given; never
    prometheus_client's global registry). Forward passes are counted by whoever built the served
    model with `metrics.observe_pass` as its observer."""
    metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
    if serving.current is not None:
        metrics.serving(serving.current)
    app = falcon.App(middleware=[AccessLog(), RequestMetrics(metrics)])
    app.add_error_handler(Exception, handle_unexpected)
    multipart = app.req_options.media_handlers[falcon.MEDIA_MULTIPART]
    multipart.parse_options.max_body_part_count = 8

    predict = PredictResource(serving, config, state, metrics)
    app.add_route("/predict", predict)
    app.add_route("/upload", predict)  # the original whatcar app's path
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(serving, state))
    app.add_route("/metadata", MetadataResource(serving))
    app.add_route("/", StaticResource("index.html", falcon.MEDIA_HTML))
    app.add_route("/static/app.js", StaticResource("app.js", falcon.MEDIA_JS))
    app.add_route("/static/app.css", StaticResource("app.css", "text/css; charset=utf-8"))
    app.add_route("/metrics", MetricsResource(metrics.registry))
    app.add_route("/openapi.json", OpenApiResource(config, serving))
    v2.register(app, config, serving, state, metrics)
    if config.model_control == "explicit":
        repository.register(app, config, serving)
    return app


def start_serving(config: Config, metrics: Metrics) -> LiveModel:
    """Load the current version for `config`, reporting passes and model changes to `metrics`;
    raises ArtifactError with a one-line reason."""
    handler = build_handler(config, observer=metrics.observe_pass)
    return LiveModel(config, handler, observer=metrics.observe_pass, on_change=metrics.model_changed)


def get_app(environ: dict | None = None) -> falcon.App:
    """The app for any WSGI server, configured from WHATCAR_* variables alone, e.g.
    `gunicorn 'serve.app:get_app()'`. The model is loaded and warmed up before it returns.

    Only `python -m serve` adds what Waitress is set up for there: the request body cut-off
    before reading, slow-client timeouts, the SIGTERM drain and reloads on SIGHUP (see
    serve/server.py)."""
    # Flags are not read: under another server, sys.argv holds that server's own arguments.
    config = load_config([], environ)
    configure_logging(config.log_level)
    metrics = Metrics(CollectorRegistry())
    return create_app(config, start_serving(config, metrics), State(ready=True), metrics)
