"""/metrics, read back with prometheus_client's own text parser."""

import base64
import threading
import time

import falcon.testing
import pytest
from prometheus_client import CollectorRegistry

from serve.app import create_app
from serve.errors import ImageRejected
from serve.handler import Handler
from serve.live_model import LiveModel
from serve.metrics import Metrics, rejection_reasons
from serve.scheduler import Model
from tests.support.metrics import scrape, value
from tests.support.paths import car_photos


@pytest.fixture()
def fresh(config, serving, state):
    def build() -> falcon.testing.TestClient:
        return falcon.testing.TestClient(create_app(config, serving, state))
    return build


@pytest.fixture()
def observed(config, handler, state):
    """An app whose model reports its forward passes to the app's metrics, as the server's does:
    one shared inference thread, micro-batches of 2, and a forward pass slowed down so that
    requests arriving during one pass share the next."""
    metrics = Metrics(CollectorRegistry())

    def slow(batch):
        time.sleep(0.2)
        return handler.artifact.runner(batch)

    slow.ran = lambda images: f"slow b{images}"  # what a runner names each pass by (serve/runtime/shapes.py)

    model = Model(slow, handler.model.preprocess, handler.artifact.input_size, workers=1, micro_batch=2,
                  observer=metrics.observe_pass, warm_up_rounds=1)
    model.wait_ready(60)
    live = LiveModel(config, Handler(handler.artifact, model))
    yield falcon.testing.TestClient(create_app(config, live, state, metrics))
    model.close()


def test_requests_inference_batches_and_rejections_are_counted(observed, handler):
    client = observed
    photos = car_photos()[:3]
    jpeg = {"Content-Type": "image/jpeg"}
    answer = client.simulate_post("/predict", body=photos[0].read_bytes(), headers=jpeg)
    assert answer.status_code == 200 and answer.json["forward_pass"] == {"ran": "slow b1", "images": 1}
    assert client.simulate_post("/predict", body=b"plain text", headers=jpeg).status_code == 415
    assert client.simulate_post("/predict", body=photos[0].read_bytes()[:500], headers=jpeg).status_code == 400
    batch = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                         "data": [base64.b64encode(p.read_bytes()).decode() for p in photos]}]}
    assert client.simulate_post(f"/v2/models/{handler.artifact.name}/infer", json=batch).status_code == 200
    assert client.simulate_get("/no/such/page").status_code == 404

    samples = scrape(client)
    requests = "whatcar_http_requests_total"
    assert value(samples, requests, method="POST", route="/predict", status="200") == 1
    assert value(samples, requests, method="POST", route="/predict", status="415") == 1
    assert value(samples, requests, method="POST", route="/predict", status="400") == 1
    assert value(samples, requests, method="POST", route="/v2/models/{name}/infer", status="200") == 1
    assert value(samples, requests, method="GET", route="unmatched", status="404") == 1
    assert value(samples, "whatcar_http_request_duration_seconds_count", method="POST", route="/predict") == 3
    # Two forward passes: one image from /predict, three from the V2 batch. The rejected uploads
    # never reached the model.
    assert value(samples, "whatcar_inference_batch_size_count") == 2
    assert value(samples, "whatcar_inference_batch_size_sum") == 4
    assert value(samples, "whatcar_inference_batch_size_bucket", le="1.0") == 1
    assert value(samples, "whatcar_inference_batch_size_bucket", le="4.0") == 2
    assert value(samples, "whatcar_inference_duration_seconds_count") == 2
    assert value(samples, "whatcar_inference_passes_total", ran="slow b1") == 1
    assert value(samples, "whatcar_inference_passes_total", ran="slow b3") == 1
    assert value(samples, "whatcar_inference_duration_seconds_sum") >= 0.4
    assert value(samples, "whatcar_inference_queue_seconds_count") == 2
    assert value(samples, "whatcar_images_rejected_total", reason="unsupported_type") == 1
    assert value(samples, "whatcar_images_rejected_total", reason="undecodable") == 1
    assert value(samples, "whatcar_images_rejected_total", reason="too_many_pixels") == 0


def test_requests_that_share_a_forward_pass_are_observed_as_one_batch_of_two(observed):
    photo = car_photos()[0].read_bytes()
    statuses = []

    def post(delay: float) -> None:
        time.sleep(delay)
        resp = observed.simulate_post("/predict", body=photo, headers={"Content-Type": "image/jpeg"})
        statuses.append((resp.status_code, resp.json["timings_ms"]))

    # The first request holds the only inference thread for 0.2 s; the two sent meanwhile wait
    # in the queue and are scored together in the next pass.
    threads = [threading.Thread(target=post, args=(delay,)) for delay in (0.0, 0.05, 0.05)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [status for status, _ in statuses] == [200, 200, 200]
    samples = scrape(observed)
    assert value(samples, "whatcar_inference_batch_size_count") == 2
    assert value(samples, "whatcar_inference_batch_size_sum") == 3
    assert value(samples, "whatcar_inference_batch_size_bucket", le="1.0") == 1
    assert value(samples, "whatcar_inference_batch_size_bucket", le="2.0") == 2
    # The answers keep the wait for a thread apart from the forward pass itself.
    assert max(timings["queue"] for _, timings in statuses) >= 100
    assert min(timings["inference"] for _, timings in statuses) >= 200


def test_every_rejection_reason_is_exported_from_the_start(fresh):
    samples = scrape(fresh())
    reasons = {dict(labels)["reason"] for name, labels in samples if name == "whatcar_images_rejected_total"}
    assert reasons == set(rejection_reasons())
    assert {"undecodable", "unsupported_type", "too_many_pixels", "too_large", "empty"} <= reasons
    assert all(isinstance(cls.reason, str) for cls in ImageRejected.__subclasses__())


def test_model_info(fresh, handler):
    samples = scrape(fresh())
    assert value(samples, "whatcar_model_info", name=handler.artifact.name, version="1", sha256=handler.artifact.sha256,
                 classes=str(len(handler.artifact.labels))) == 1


def test_each_app_counts_in_its_own_registry(fresh):
    busy, idle = fresh(), fresh()
    for _ in range(3):
        busy.simulate_get("/healthz")
    idle.simulate_get("/healthz")
    assert value(scrape(busy), "whatcar_http_requests_total", method="GET", route="/healthz", status="200") == 3
    assert value(scrape(idle), "whatcar_http_requests_total", method="GET", route="/healthz", status="200") == 1


def test_the_global_registry_is_left_alone(fresh):
    from prometheus_client import REGISTRY

    fresh().simulate_get("/healthz")
    assert not [m for m in REGISTRY.collect() if m.name.startswith("whatcar")]
