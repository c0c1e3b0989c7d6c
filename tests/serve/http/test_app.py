"""Every endpoint and error through falcon.testing, with real photos and the committed model."""

import json

import pytest
from PIL import Image

from tests.support.paths import car_photos
from tests.support.uploads import encode, multipart

# Photos the committed model must name correctly (the folder is the class).
KNOWN = [p for p in car_photos() if p.stem in ("047", "030", "029")]


@pytest.mark.parametrize("path", KNOWN, ids=lambda p: p.parent.name)
def test_raw_body_names_the_car(client, path):
    resp = client.simulate_post("/predict", body=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200
    body = resp.json
    assert body["predictions"][0]["label"] == path.parent.name
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert len(probabilities) == 5 and 0 < sum(probabilities) <= 1.0001
    assert len(body["model"]["sha256"]) == 64
    assert set(body["timings_ms"]) == {"preprocess", "queue", "inference", "postprocess", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["inference"] > 0


def test_multipart_upload_and_upload_alias(client):
    path = KNOWN[0]
    data, content_type = multipart([("file", path.name, path.read_bytes(), "image/jpeg")])
    for route in ("/predict", "/upload"):
        resp = client.simulate_post(route, body=data, headers={"Content-Type": content_type})
        assert resp.status_code == 200, resp.text
        assert resp.json["predictions"][0]["label"] == path.parent.name


def test_top_k_parameter(client, photo):
    resp = client.simulate_post("/predict", body=photo, params={"top_k": "2"},
                                headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200 and len(resp.json["predictions"]) == 2
    resp = client.simulate_post("/predict", body=photo, params={"top_k": "0"}, headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 400
    resp = client.simulate_post("/predict", body=photo, params={"top_k": "x"}, headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 400


def test_empty_body(client):
    resp = client.simulate_post("/predict", body=b"", headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 400 and resp.json["code"] == "empty"


def test_wrong_content_type_lists_accepted_types(client, photo):
    resp = client.simulate_post("/predict", body=photo, headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415
    assert "image/jpeg" in resp.json["description"]
    assert "image/png" in resp.headers["Accept-Post"]


def test_text_sent_as_jpeg(client):
    resp = client.simulate_post("/predict", body=b"<html>not a car</html>", headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 415 and resp.json["code"] == "unsupported_type"


def test_truncated_jpeg(client, photo):
    resp = client.simulate_post("/predict", body=photo[: len(photo) // 2], headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 400 and resp.json["code"] == "undecodable"
    assert "truncated" in resp.json["description"]


def test_body_over_limit_is_refused_from_content_length(client, config):
    resp = client.simulate_post("/predict", body=b"\xff" * (config.max_upload_bytes + 1),
                                headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 413 and resp.json["code"] == "too_large"


def test_decompression_bomb(client):
    image = Image.new("L", (3000, 3000))  # 9 MP against a 4 MP limit, tiny when compressed
    resp = client.simulate_post("/predict", body=encode(image, "PNG"), headers={"Content-Type": "image/png"})
    assert resp.status_code == 422 and resp.json["code"] == "too_many_pixels"


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "RGBA", "L", "I;16", "1"])
def test_odd_modes_are_scored(client, mode):
    image = Image.open(KNOWN[0]).convert("RGB")
    if mode == "I;16":
        # Each grey level v as the 16-bit value v * 257 (both bytes v), as a 16-bit PNG stores it.
        grey = image.convert("L").tobytes()
        odd = Image.frombytes("I;16", image.size, bytes(b for v in grey for b in (v, v)))
        fmt = "PNG"
    else:
        odd = image.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    resp = client.simulate_post("/predict", body=encode(odd, fmt), headers={"Content-Type": f"image/{fmt.lower()}"})
    assert resp.status_code == 200, resp.text


def test_multipart_without_file_field(client, photo):
    data, content_type = multipart([("image", "car.jpg", photo, "image/jpeg")])
    resp = client.simulate_post("/predict", body=data, headers={"Content-Type": content_type})
    assert resp.status_code == 400 and "'file'" in resp.json["description"]


def test_multipart_with_two_files(client, photo):
    data, content_type = multipart([("file", "a.jpg", photo, "image/jpeg"), ("file", "b.jpg", photo, "image/jpeg")])
    resp = client.simulate_post("/predict", body=data, headers={"Content-Type": content_type})
    assert resp.status_code == 400


def test_multipart_with_wrong_boundary(client, photo):
    data, _ = multipart([("file", "a.jpg", photo, "image/jpeg")], boundary="one")
    resp = client.simulate_post("/predict", body=data, headers={"Content-Type": "multipart/form-data; boundary=two"})
    assert resp.status_code == 400


def test_health_ready_and_not_ready(client, unloaded, photo):
    assert client.simulate_get("/healthz").json == {"status": "alive"}
    assert client.simulate_get("/readyz").status_code == 200
    assert unloaded.simulate_get("/healthz").json == {"status": "alive"}
    assert unloaded.simulate_get("/readyz").status_code == 503
    resp = unloaded.simulate_post("/predict", body=photo, headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 503 and resp.json["description"] == "no model is loaded"


def test_metadata_comes_from_the_manifest(client, handler):
    body = client.simulate_get("/metadata").json
    manifest = handler.artifact.manifest.data
    assert body["name"] == manifest["name"]
    assert body["classes"] == handler.artifact.labels and body["num_classes"] == manifest["num_classes"]
    assert body["sha256"] == manifest["files"]["model"]["sha256"]
    assert body["input"]["height"] == manifest["input"]["height"]
    assert body["preprocessing"]["steps"] == manifest["preprocessing"]["steps"]
    assert body["versions"]["torch"] and body["validation"] == manifest["validation"]


def test_unknown_route_and_method(client):
    assert client.simulate_get("/nope").status_code == 404
    resp = client.simulate_get("/predict")
    assert resp.status_code == 405


def test_page_is_served_with_security_headers(client):
    resp = client.simulate_get("/")
    assert resp.status_code == 200 and "text/html" in resp.headers["Content-Type"]
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "<script src=\"/static/app.js\"" in resp.text
    js = client.simulate_get("/static/app.js")
    assert js.status_code == 200 and "textContent" in js.text and "innerHTML" not in js.text


def test_internal_error_is_json_without_traceback(client, handler, monkeypatch, photo):
    def broken(batch):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(handler.artifact, "runner", broken)
    resp = client.simulate_post("/predict", body=photo, headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 500
    assert "secret" not in resp.text and "Traceback" not in resp.text
    assert json.loads(resp.text)["title"]
    monkeypatch.undo()
    assert client.simulate_post("/predict", body=photo, headers={"Content-Type": "image/jpeg"}).status_code == 200


def test_get_app_builds_the_app_from_whatcar_variables_for_another_wsgi_server(tmp_path, monkeypatch):
    """What a WSGI server such as gunicorn does with `serve.process.startup:get_app()`, shown with the standard
    library's own server: the settings come from WHATCAR_* alone, never from the host's argv."""
    import http.client
    import io
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from serve.process.config import ConfigError
    from serve.process.startup import get_app
    from tests.support.tiny_artifact import write_tiny_artifact

    folder = write_tiny_artifact(tmp_path / "tiny")
    monkeypatch.setattr("sys.argv", ["gunicorn", "--workers", "3", "serve.process.startup:get_app()"])
    with pytest.raises(ConfigError, match="WHATCAR_TOP_K"):
        get_app({"WHATCAR_MODEL_DIR": str(folder), "WHATCAR_TOP_K": "many"})

    app = get_app({"WHATCAR_MODEL_DIR": str(folder), "WHATCAR_TOP_K": "2", "WHATCAR_INFERENCE_WORKERS": "1"})

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        red = io.BytesIO()
        Image.new("RGB", (40, 30), (250, 60, 10)).save(red, "PNG")
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
        connection.request("POST", "/predict", body=red.getvalue(), headers={"Content-Type": "image/png"})
        answer = connection.getresponse()
        body = json.loads(answer.read())
    finally:
        server.shutdown()
    assert answer.status == 200
    assert body["model"]["name"] == "tiny-test"
    assert [p["label"] for p in body["predictions"]] == ["Alpha Coupe 2001", "Beta Van 2002"]


def test_the_committed_artifacts_check_photos_get_the_top1_its_manifest_records(client, handler):
    checks = handler.artifact.manifest.checks
    assert len(checks) >= 3
    for check in checks:
        path = handler.artifact.manifest.verified(handler.artifact.folder, check.file, check.sha256, "check")
        resp = client.simulate_post("/predict", body=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert resp.status_code == 200 and resp.json["predictions"][0]["label"] == check.top1, check.file
