"""Replacing the served model while it serves: checks before the switch, leases, the repository
API and its access rules. In process, with tiny models; test_reload_process.py runs real servers."""

import base64
import io
import json
import os
import shutil
import threading

import falcon.testing
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from serve.app import State, create_app, start_serving
from serve.config import Config, ConfigError, load_config
from serve.handler import build_handler, load_handler
from serve.live_model import LiveModel, NotServing, NotThisModel
from serve.metrics import Metrics
from serve.scheduler import ModelClosed
from serve.versions import ModelFolder
from tests.support.metrics import scrape, value
from tests.support.tiny_artifact import add_tiny_version, write_manifest

TOKEN = "0123456789abcdef-test-token"
OLD_LABELS = ["Alpha Coupe 2001", "Beta Van 2002", "Gamma Sedan 2003"]
NEW_LABELS = ["Delta Coupe 2011", "Epsilon Van 2012", "Zeta Sedan 2013"]


def red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (240, 40, 20)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture()
def model_dir(tmp_path):
    folder = tmp_path / "models"
    add_tiny_version(folder, labels=OLD_LABELS)
    return folder


def setup(model_dir, **settings):
    config = Config(model_dir=model_dir, inference_workers=1, solo_threads=1, **settings)
    metrics = Metrics(CollectorRegistry())
    serving = start_serving(config, metrics)
    client = falcon.testing.TestClient(create_app(config, serving, State(ready=True), metrics))
    return serving, client


def predict(client) -> dict:
    resp = client.simulate_post("/predict", body=red_png(), headers={"Content-Type": "image/png"})
    assert resp.status_code == 200, resp.text
    return resp.json


def admin(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_reload_switches_to_the_current_version_and_answers_name_it(model_dir):
    serving, client = setup(model_dir)
    try:
        assert predict(client)["model"]["version"] == "1"
        assert predict(client)["predictions"][0]["label"] == OLD_LABELS[0]
        add_tiny_version(model_dir, labels=NEW_LABELS)
        status = serving.reload()
        assert (status.outcome, status.version, status.serving) == ("ok", "2", "2")
        answer = predict(client)
        assert answer["model"]["version"] == "2" and answer["predictions"][0]["label"] == NEW_LABELS[0]
        meta = client.simulate_get("/metadata").json
        assert meta["version"] == "2" and meta["reload"]["outcome"] == "ok" and meta["reload"]["count"] == 1
        assert serving.reload().outcome == "unchanged"
        samples = scrape(client)
        assert value(samples, "whatcar_model_reloads_total", outcome="ok") == 1
        assert value(samples, "whatcar_model_reloads_total", outcome="unchanged") == 1
        assert value(samples, "whatcar_model_info", name="tiny-test", version="2", sha256=answer["model"]["sha256"],
                     classes="3") == 1
    finally:
        serving.close()


def break_checksum(folder):
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in NEW_LABELS[::-1]))


def break_label_count(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in NEW_LABELS + ["Eta Wagon 2014"]))
    manifest["num_classes"] = 4
    write_manifest(folder, manifest)


def break_checks(folder):
    # The labels are shuffled consistently with their checksum, so only the check photos can tell.
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in NEW_LABELS[::-1]))
    write_manifest(folder, manifest)


def break_torchscript(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "model.pt").write_bytes(b"PK\x03\x04 not a TorchScript archive" * 50)
    write_manifest(folder, manifest)


def drop_checks(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["checks"]
    write_manifest(folder, manifest)


@pytest.mark.parametrize("breakage, reason", [
    (break_checksum, "labels.txt sha256 is"),
    (break_label_count, "model outputs shape"),
    (break_checks, "is scored 'Zeta Sedan 2013' but the export recorded 'Delta Coupe 2011'"),
    (break_torchscript, "not a loadable TorchScript module"),
    (drop_checks, "lists no check photos"),
], ids=["checksum", "label-count", "check-photos", "not-torchscript", "no-checks"])
def test_a_broken_version_leaves_the_old_one_serving_and_says_why(model_dir, breakage, reason):
    serving, client = setup(model_dir)
    try:
        version = add_tiny_version(model_dir, labels=NEW_LABELS)
        breakage(model_dir / version)
        status = serving.reload()
        assert status.outcome == "failed" and reason in status.reason, status.reason
        assert status.version == "2" and status.serving == "1"
        answer = predict(client)
        assert answer["model"]["version"] == "1" and answer["predictions"][0]["label"] == OLD_LABELS[0]
        meta = client.simulate_get("/metadata").json
        assert meta["version"] == "1" and meta["reload"]["outcome"] == "failed" and reason in meta["reload"]["reason"]
        assert value(scrape(client), "whatcar_model_reloads_total", outcome="failed") == 1
    finally:
        serving.close()


def test_a_request_inside_finishes_on_the_model_it_started_with(model_dir):
    serving, client = setup(model_dir)
    try:
        add_tiny_version(model_dir, labels=NEW_LABELS)
        with serving.lease() as old:
            assert serving.reload().outcome == "ok"
            # The new model serves new requests, and the old one still scores for its lease holder.
            assert predict(client)["model"]["version"] == "2"
            answer = old.predict([red_png()]).answers[0]
            assert old.artifact.version == "1" and answer.ranked[0].label == OLD_LABELS[0]
            # Both versions run on the same inference threads.
            new = serving.current
            assert new.artifact.version == "2" and new.model.threads is old.model.threads
            threads = old.model.threads.threads
            assert threads and all(thread.is_alive() for thread in threads)
        # Its last lease ended: the old model is closed, the threads go on serving the new one.
        with pytest.raises(ModelClosed):
            old.predict([red_png()])
        assert old.model.runner is None
        assert all(thread.is_alive() for thread in threads) and new.model.threads.threads == threads
        assert predict(client)["model"]["version"] == "2"
    finally:
        serving.close()


def test_a_lease_for_a_name_and_version_is_refused_once_another_version_is_live(model_dir):
    serving, client = setup(model_dir)
    try:
        with serving.lease("tiny-test", "1") as handler:
            assert handler.artifact.version == "1"
        with pytest.raises(NotThisModel, match="unknown model 'other'"):
            with serving.lease("other"):
                pass
        add_tiny_version(model_dir, labels=NEW_LABELS)
        assert serving.reload().outcome == "ok"
        with pytest.raises(NotThisModel, match="has no version '1' loaded; it serves version '2'"):
            with serving.lease("tiny-test", "1"):
                pass
    finally:
        serving.close()


def test_v2_inference_checks_the_version_where_it_takes_the_lease(model_dir, monkeypatch):
    """A swap between the route's first look and its lease must not serve a version other than the
    one asked for: the lease itself checks."""
    from serve import v2

    serving, client = setup(model_dir)
    try:
        add_tiny_version(model_dir, labels=NEW_LABELS)
        looked = []

        def look_then_swap(self, name, version):
            handler = self.serving.current  # what the route saw: version 1
            looked.append(handler.artifact.version)
            assert serving.reload().outcome == "ok"  # ...and the swap right after
            return handler

        monkeypatch.setattr(v2.ModelScope, "check", look_then_swap)
        image = base64.b64encode(red_png()).decode()
        request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]}
        resp = client.simulate_post("/v2/models/tiny-test/versions/1/infer", json=request)
        assert looked == ["1"] and resp.status_code == 404
        assert "it serves version '2'" in resp.json["error"]
    finally:
        serving.close()


def test_every_reload_loads_on_one_thread_whoever_asks(model_dir):
    config = Config(model_dir=model_dir, inference_workers=1, solo_threads=1)
    loaded_on = []

    def loader(*args, **kwargs):
        loaded_on.append(threading.current_thread())
        return load_handler(*args, **kwargs)

    serving = LiveModel(config, build_handler(config), loader=loader)
    models = ModelFolder(model_dir)
    add_tiny_version(model_dir, labels=NEW_LABELS)
    outcomes = []

    def reload(version):
        models.switch_to(version)
        outcomes.append(serving.reload().outcome)

    try:
        # Asked from three different threads, as HTTP threads and SIGHUP would.
        for version in ["2", "1", "2"]:
            asker = threading.Thread(target=reload, args=(version,))
            asker.start()
            asker.join(60)
    finally:
        serving.close()
    assert outcomes == ["ok", "ok", "ok"]
    assert len(set(loaded_on)) == 1 and loaded_on[0].name.startswith("whatcar-load")


def test_concurrent_requests_during_reloads_all_succeed_on_one_of_the_versions(model_dir):
    serving, client = setup(model_dir)
    add_tiny_version(model_dir, labels=NEW_LABELS)
    models, failures, seen = ModelFolder(model_dir), [], set()
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            resp = client.simulate_post("/predict", body=red_png(), headers={"Content-Type": "image/png"})
            if resp.status_code != 200:
                failures.append(resp.status_code)
            else:
                seen.add(resp.json["model"]["version"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for version in ["2", "1", "2", "1"]:
            models.switch_to(version)
            assert serving.reload().outcome == "ok"
            assert predict(client)["model"]["version"] == version
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        serving.close()
    assert not failures and seen == {"1", "2"}


def test_unload_then_load_through_the_repository_api(model_dir):
    serving, client = setup(model_dir, model_control="explicit", admin_token=TOKEN)
    try:
        index = client.simulate_post("/v2/repository/index", headers=admin())
        assert index.status_code == 200
        assert index.json == [{"name": "tiny-test", "version": "1", "state": "READY", "reason": ""}]
        assert client.simulate_post("/v2/repository/models/tiny-test/unload", headers=admin()).status_code == 200
        png = {"Content-Type": "image/png"}
        assert client.simulate_post("/predict", body=red_png(), headers=png).status_code == 503
        assert client.simulate_get("/readyz").status_code == 503
        assert client.simulate_get("/metadata").json["reload"]["outcome"] == "unloaded"
        assert client.simulate_post("/v2/repository/models/tiny-test/load", headers=admin()).status_code == 200
        assert predict(client)["model"]["version"] == "1"
    finally:
        serving.close()


def test_load_a_version_by_parameter_or_by_triton_version_policy(model_dir):
    serving, client = setup(model_dir, model_control="explicit", admin_token=TOKEN)
    add_tiny_version(model_dir, labels=NEW_LABELS)
    try:
        resp = client.simulate_post("/v2/repository/models/tiny-test/load", headers=admin(),
                                    json={"parameters": {"version": "2"}})
        assert resp.status_code == 200, resp.text
        assert predict(client)["model"]["version"] == "2"
        policy = json.dumps({"version_policy": {"specific": {"versions": [1]}}})
        resp = client.simulate_post("/v2/repository/models/tiny-test/load", headers=admin(),
                                    json={"parameters": {"config": policy}})
        assert resp.status_code == 200, resp.text
        assert predict(client)["model"]["version"] == "1"
        assert client.simulate_get("/v2/models/tiny-test/versions/1/ready").status_code == 200
        assert client.simulate_get("/v2/models/tiny-test/versions/2/ready").status_code == 404
    finally:
        serving.close()


@pytest.mark.parametrize("parameters", [
    {"version": "../1"}, {"version": "/etc/passwd"}, {"version": "1/../../models/1"}, {"version": "http://x/y"},
    {"version": "7"}, {"file:1/model.pt": "AAAA"}, {"config": '{"version_policy": {"latest": {"num_versions": 2}}}'},
], ids=["dotdot", "absolute", "nested", "url", "missing", "files", "policy"])
def test_versions_are_names_inside_the_model_folder_never_paths(model_dir, parameters):
    serving, client = setup(model_dir, model_control="explicit", admin_token=TOKEN)
    try:
        resp = client.simulate_post("/v2/repository/models/tiny-test/load", headers=admin(),
                                    json={"parameters": parameters})
        assert resp.status_code == 400 and "error" in resp.json
        assert predict(client)["model"]["version"] == "1"
    finally:
        serving.close()


@pytest.mark.parametrize("headers, status", [
    ({}, 401), (admin("not-the-admin-token-at-all"), 401), ({"Authorization": f"Basic {TOKEN}"}, 401),
    (admin(), 200),
], ids=["missing", "wrong", "other-scheme", "right"])
def test_the_repository_api_needs_the_admin_token(model_dir, headers, status):
    serving, client = setup(model_dir, model_control="explicit", admin_token=TOKEN)
    try:
        for path in ("/v2/repository/index", "/v2/repository/models/tiny-test/load"):
            resp = client.simulate_post(path, headers=headers)
            assert resp.status_code == status, (path, resp.text)
            if status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    finally:
        serving.close()


def test_the_repository_api_is_off_unless_configured(model_dir):
    serving, client = setup(model_dir)
    try:
        assert client.simulate_post("/v2/repository/index", headers=admin()).status_code == 404
        assert "model_repository" not in client.simulate_get("/v2").json["extensions"]
    finally:
        serving.close()


def test_without_a_token_the_repository_api_is_for_loopback_only(model_dir):
    base = ["--model-dir", str(model_dir), "--model-control", "explicit"]
    assert load_config(base, environ={}).admin_token is None  # 127.0.0.1 by default: allowed
    for host in ("0.0.0.0", "192.0.2.7", "::"):
        with pytest.raises(ConfigError, match="needs WHATCAR_ADMIN_TOKEN"):
            load_config([*base, "--host", host], environ={})
    config = load_config([*base, "--host", "0.0.0.0"], environ={"WHATCAR_ADMIN_TOKEN": TOKEN})
    assert config.admin_token == TOKEN and TOKEN not in repr(config)
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_config(base, environ={"WHATCAR_ADMIN_TOKEN": "short"})


def test_a_request_while_unloaded_is_refused_not_crashed(model_dir):
    serving, client = setup(model_dir)
    serving.unload()
    with pytest.raises(NotServing):
        with serving.lease():
            pass
    resp = client.simulate_post("/v2/models/tiny-test/infer", json={"inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [1, 3, 16, 16], "data": [0] * 768}]})
    assert resp.status_code == 503 and "not loaded" in resp.json["error"]


def test_the_committed_default_folder_reloads_unchanged(tmp_path):
    # A deployment's reload with nothing new must not swap the model.
    from tests.support.paths import ARTIFACTS

    folder = tmp_path / "artifacts"
    shutil.copytree(ARTIFACTS, folder, symlinks=True)
    serving, client = setup(folder)
    try:
        assert os.readlink(folder / "current") == "1"
        assert serving.reload().outcome == "unchanged"
        assert torch.is_tensor(serving.current.predict([red_png()]).answers[0].probabilities)
    finally:
        serving.close()
