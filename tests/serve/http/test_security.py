"""Security properties of the serving side: escaping, headers, bind address, no file paths from requests."""

from __future__ import annotations

import builtins
import io
import json
import pathlib
import re

import falcon.inspect
import falcon.testing
import pytest
from PIL import Image

from serve.http.app import STATIC, create_app
from serve.model.handler import build_handler
from serve.model.live_version import LiveVersion
from serve.process.config import Config, load_config
from tests.support.paths import ARTIFACT
from tests.support.tiny_artifact import write_tiny_artifact

HOSTILE_LABELS = ['<script>alert("label")</script> Coupe 2001', "Beta </li><img src=x onerror=alert(1)> Van",
                  "Gamma & \"Sons\" 'Sedan' 2003"]


@pytest.fixture(scope="module")
def hostile_client(tmp_path_factory) -> falcon.testing.TestClient:
    """An app serving a model whose labels are markup, as a tampered or careless export could hold."""
    folder = write_tiny_artifact(tmp_path_factory.mktemp("hostile") / "artifact", labels=HOSTILE_LABELS)
    config = Config(model_dir=folder, inference_workers=1)
    return falcon.testing.TestClient(create_app(config, LiveVersion(config.inference, build_handler(config.inference))))


def jpeg(color=(30, 60, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(out, "JPEG")
    return out.getvalue()


def test_labels_travel_as_json_data_never_as_markup(hostile_client):
    resp = hostile_client.simulate_post("/predict", body=jpeg(), headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"  # a browser may not sniff it into HTML
    assert {p["label"] for p in resp.json["predictions"]} == set(HOSTILE_LABELS)
    metadata = hostile_client.simulate_get("/metadata")
    assert metadata.headers["Content-Type"].startswith("application/json")
    assert metadata.json["classes"] == HOSTILE_LABELS
    # The page itself is static: no label is ever rendered into it by the server.
    page = hostile_client.simulate_get("/").text
    assert "alert" not in page and "onerror" not in page


def test_page_script_writes_text_never_html():
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "srcdoc"):
        assert sink not in script, sink
    # Labels from the server reach the page through textContent only.
    assert re.search(r"\.textContent\s*=\s*p\.label", script)
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline script would need 'unsafe-inline'"
    assert not re.search(r"\son\w+\s*=", page), "inline event handlers would need 'unsafe-inline'"


def test_page_has_a_strict_content_security_policy(client):
    for path in ("/", "/static/app.js", "/static/app.css"):
        resp = client.simulate_get(path)
        assert resp.status_code == 200
        policy = dict(part.strip().split(" ", 1) for part in resp.headers["Content-Security-Policy"].split(";"))
        assert policy["default-src"] == "'none'"
        assert policy["script-src"] == "'self'" and "unsafe" not in resp.headers["Content-Security-Policy"]
        assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/", None), ("GET", "/static/app.js", None), ("GET", "/healthz", None), ("GET", "/readyz", None),
    ("GET", "/metadata", None), ("GET", "/no/such/route", None), ("GET", "/predict", None),
    ("POST", "/predict", b"not an image"), ("POST", "/predict", b""),
])
def test_every_response_says_nosniff(client, method, path, body):
    resp = client.simulate_request(method, path, body=body, headers={"Content-Type": "image/jpeg"})
    assert resp.headers["X-Content-Type-Options"] == "nosniff", (path, resp.status_code)


def test_default_bind_address_is_loopback(tmp_path):
    assert Config().host == "127.0.0.1"
    assert load_config(["--model-dir", str(tmp_path)], environ={}).host == "127.0.0.1"


def test_no_route_is_built_from_a_filesystem_path(client):
    info = falcon.inspect.inspect_app(client.app)
    assert info.static_routes == [] and info.sinks == []
    # The only URI fields are the model name and version of the V2 protocol, compared, never opened.
    fields = {field for route in info.routes for field in re.findall(r"\{(\w+)", route.path)}
    assert fields <= {"name", "version"}


@pytest.mark.parametrize("path", [
    "/static/../serve/http/app.py", "/static/%2e%2e/%2e%2e/artifacts/manifest.json",
    "/static/..%2f..%2fartifacts%2flabels.txt",
    "/static/app.js/../../artifacts/manifest.json", "/static//etc/passwd", "/..%2f..%2fetc%2fpasswd",
    "/v2/models/..%2f..%2fartifacts%2fmanifest.json", "/v2/models/%2e%2e/versions/..%2f..%2fmodel.pt",
    "/static/app.css%00.js", "/static/APP.JS",
])
def test_traversal_attempts_never_reach_a_file(client, path):
    manifest = (ARTIFACT / "manifest.json").read_text(encoding="utf-8")
    opened = []
    real_open, real_path_open = builtins.open, pathlib.Path.open

    def watch_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def watch_path_open(self, *args, **kwargs):
        opened.append(str(self))
        return real_path_open(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", watch_open)
        patch.setattr(pathlib.Path, "open", watch_path_open)
        resp = client.simulate_get(path)
    assert opened == [], opened
    assert resp.status_code in (400, 404), (path, resp.status_code)
    assert "root:" not in resp.text and "sha256" not in resp.text and manifest[:40] not in resp.text
    assert json.loads(resp.text or "{}") is not None  # errors are JSON, not a file's bytes
