"""Prometheus metrics for one app: requests, latencies, forward passes and their batch sizes,
queue waits, rejected images, model info and the runtime serving it.

Every collector lives in the registry the app is given, never in prometheus_client's global
one, so several apps (tests, or two models in one process) keep separate counts.
"""

from __future__ import annotations

import time

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest

from ..model.errors import ImageRejected

# Whole requests include upload and decode, so they reach further than a forward pass alone.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Requests that matched no route are counted under one label, so probing scanners cannot grow
# the number of series without bound.
UNMATCHED = "unmatched"
RELOAD_OUTCOMES = ("ok", "unchanged", "failed", "unloaded")


def rejection_reasons() -> list[str]:
    """Every `reason` an ImageRejected subclass can carry, so each series exists from the start."""
    reasons, pending = {ImageRejected.reason}, list(ImageRejected.__subclasses__())
    while pending:
        cls = pending.pop()
        reasons.add(cls.reason)
        pending.extend(cls.__subclasses__())
    return sorted(reasons)


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter("whatcar_http_requests", "HTTP requests answered, by route and status",
                                ["method", "route", "status"], registry=registry)
        self.request_seconds = Histogram("whatcar_http_request_duration_seconds",
                                         "Time from reading a request to handing back its response",
                                         ["method", "route"], buckets=REQUEST_BUCKETS, registry=registry)
        self.inference_seconds = Histogram("whatcar_inference_duration_seconds",
                                           "Time of one forward pass of the model (any batch size)",
                                           buckets=INFERENCE_BUCKETS, registry=registry)
        self.batch_size = Histogram("whatcar_inference_batch_size", "Images in each forward pass",
                                    buckets=BATCH_BUCKETS, registry=registry)
        # Bounded: a model's compiled shapes, and torchscript.
        self.passes = Counter("whatcar_inference_passes", "Forward passes by what ran them: a compiled shape "
                              "(b1t2: batch 1 on 2 threads; b1-64: the dynamic-batch package) or torchscript",
                              ["ran"], registry=registry)
        self.queue_seconds = Histogram("whatcar_inference_queue_seconds",
                                       "Time a request waited for an inference thread",
                                       buckets=INFERENCE_BUCKETS, registry=registry)
        self.rejected = Counter("whatcar_images_rejected", "Uploads refused before scoring, by reason",
                                ["reason"], registry=registry)
        for reason in rejection_reasons():
            self.rejected.labels(reason=reason)
        self.model = Info("whatcar_model", "The artifact being served (all labels empty while none is)",
                          registry=registry)
        self.runtime = Info("whatcar_runtime", "What runs the model served: compiled or torchscript, and why "
                            "(empty while no model is served)", registry=registry)
        self.reloads = Counter("whatcar_model_reloads", "Model reloads and unloads, by outcome", ["outcome"],
                               registry=registry)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome=outcome)

    def serving(self, handler) -> None:
        """Say which model serves now (None: none does)."""
        if handler is None:
            self.model.info({"name": "", "version": "", "sha256": "", "classes": ""})
            self.runtime.info({"name": "", "reason": ""})
        else:
            artifact = handler.artifact
            self.model.info({"name": artifact.name, "version": artifact.version, "sha256": artifact.sha256,
                             "classes": str(len(artifact.labels))})
            self.runtime.info(artifact.runtime.as_dict())

    def model_changed(self, status, handler) -> None:
        """Called by serve/model/live_version.py after every reload or unload."""
        self.reloads.labels(outcome=status.outcome).inc()
        self.serving(handler)

    def observe_pass(self, seconds: float, batch: int, ran: str) -> None:
        """Called by the inference thread that ran the pass (see serve/model/scheduler.py)."""
        self.inference_seconds.observe(seconds)
        self.batch_size.observe(batch)
        self.passes.labels(ran=ran).inc()

    def observe_queue(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)

    def observe_rejection(self, exc: ImageRejected) -> None:
        self.rejected.labels(reason=exc.reason).inc()


class RequestMetrics:
    """Middleware counting every response by the route template it matched."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.metrics_started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded: bool) -> None:
        started = getattr(req.context, "metrics_started", None)
        route = (req.uri_template or UNMATCHED) if resource is not None else UNMATCHED
        method = req.method if req.method in falcon.COMBINED_METHODS else "other"
        self.metrics.requests.labels(method=method, route=route, status=str(resp.status_code)).inc()
        if started is not None:
            self.metrics.request_seconds.labels(method=method, route=route).observe(
                time.perf_counter() - started)


class MetricsResource:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = generate_latest(self.registry)
        resp.content_type = CONTENT_TYPE_LATEST
