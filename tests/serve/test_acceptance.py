"""The "unknown" answer: whether a top class counts as an answer, in /predict, /v2, /metadata and
the batch rows; and an export without thresholds, which is served unjudged."""

from __future__ import annotations

import base64
import io
import json

import falcon.testing
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from serve.app import State, create_app, start_serving
from serve.artifact import load_artifact
from serve.config import Config
from serve.errors import ArtifactError
from serve.manifest import Acceptance
from serve.metrics import Metrics
from serve.postprocess import Output, judge
from tests.serve.tiny_artifact import write_tiny_artifact

LABELS = ["Alpha Coupe 2001", "Beta Van 2002", "Gamma Sedan 2003"]
RULE = {"min_probability": 0.6, "min_familiarity": 0.1, "rule": "test rule",
        "figures": {"validation": {"accepted": 0.9}}}
# Red enough to be sure (0.93) and green enough to look familiar (60/255); red but no green at
# all (unfamiliar); three channels nearly alike (familiar, but no class above 0.41).
SURE, UNFAMILIAR, UNSURE = (250, 60, 10), (250, 10, 10), (120, 100, 90)


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), colour).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------- the rule alone


def output(*probabilities: float, familiarity: float | None = None) -> Output:
    return Output(torch.tensor(probabilities), familiarity)


def test_judging_needs_a_threshold():
    assert judge(output(0.9, 0.1), None, LABELS[:2]).accepted is None


def test_the_probability_threshold_and_the_familiarity_gate():
    rule = Acceptance(0.6, 0.1)
    assert judge(output(0.7, 0.2, 0.1, familiarity=0.3), rule, LABELS).accepted is True
    unsure = judge(output(0.5, 0.3, 0.2, familiarity=0.3), rule, LABELS)
    assert unsure.accepted is False and unsure.reason == "not one of the 3 models I know; closest: Alpha Coupe 2001"
    unfamiliar = judge(output(0.1, 0.9, 0.0, familiarity=0.05), rule, LABELS)
    assert unfamiliar.accepted is False
    assert unfamiliar.reason == "this does not look like the car photos I know; closest: Beta Van 2002"
    # Exactly at a threshold is in.
    assert judge(output(0.6, 0.4, 0.0, familiarity=0.1), rule, LABELS).accepted is True


@pytest.mark.parametrize("block", [{"min_probability": "high"}, {"min_familiarity": 0.1}])
def test_a_malformed_threshold_is_refused_when_the_model_loads(tmp_path, block):
    folder = write_tiny_artifact(tmp_path / "artifact", LABELS, acceptance=block)
    with pytest.raises(ArtifactError, match="'acceptance' needs a numeric min_probability"):
        load_artifact(folder)


def test_a_request_threshold_replaces_the_exports():
    rule = Acceptance(0.6, 0.1)
    assert judge(output(0.5, 0.5, 0.0, familiarity=0.3), rule, LABELS, min_probability=0.4).accepted is True
    assert judge(output(0.7, 0.3, 0.0, familiarity=0.3), rule, LABELS, min_probability=0.8).accepted is False
    # ...but not the familiarity gate, and it judges exports that recorded no threshold at all.
    assert judge(output(0.9, 0.1, 0.0, familiarity=0.05), rule, LABELS, min_probability=0.1).accepted is False
    assert judge(output(0.9, 0.1, 0.0), None, LABELS, min_probability=0.5).accepted is True


# ---------------------------------------------------------------------- through the app


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    folder = write_tiny_artifact(tmp_path_factory.mktemp("judged") / "artifact", LABELS, acceptance=RULE)
    config = Config(model_dir=folder, inference_workers=1, solo_threads=1)
    metrics = Metrics(CollectorRegistry())
    serving = start_serving(config, metrics)
    yield falcon.testing.TestClient(create_app(config, serving, State(ready=True), metrics))
    serving.close()


def predict(client, colour, **params) -> falcon.testing.Result:
    return client.simulate_post("/predict", body=png(colour), params=params, headers={"Content-Type": "image/png"})


def test_predict_says_whether_the_top_answer_is_accepted(judged):
    sure = predict(judged, SURE).json
    assert sure["accepted"] is True and "reason" not in sure and sure["predictions"][0]["label"] == LABELS[0]
    unsure = predict(judged, UNSURE).json
    assert unsure["accepted"] is False
    assert unsure["reason"] == f"not one of the 3 models I know; closest: {unsure['predictions'][0]['label']}"
    assert len(unsure["predictions"]) == 3  # still ranked
    unfamiliar = predict(judged, UNFAMILIAR).json
    assert unfamiliar["accepted"] is False and unfamiliar["reason"].startswith("this does not look like")


def test_min_probability_overrides_the_threshold_per_request(judged):
    assert predict(judged, UNSURE, min_probability="0.3").json["accepted"] is True
    assert predict(judged, SURE, min_probability="0.99").json["accepted"] is False
    for bad in ("1.5", "-0.1", "much"):
        assert predict(judged, SURE, min_probability=bad).status_code == 400


def test_metadata_shows_the_thresholds_and_their_figures(judged):
    acceptance = judged.simulate_get("/metadata").json["acceptance"]
    assert acceptance == {"enabled": True, "min_probability": 0.6, "min_familiarity": 0.1, "rule": "test rule",
                          "figures": {"validation": {"accepted": 0.9}}}


def test_v2_returns_accepted_as_an_extra_output(judged):
    images = [base64.b64encode(png(c)).decode() for c in (SURE, UNSURE, UNFAMILIAR)]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": images}]}
    body = judged.simulate_post("/v2/models/tiny-test/infer", json=request).json
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == {"probabilities", "labels", "accepted"}
    assert outputs["accepted"] == {"name": "accepted", "datatype": "BOOL", "shape": [3], "data": [True, False, False]}
    # An existing client that names its outputs gets exactly those.
    request["outputs"] = [{"name": "probabilities"}]
    assert [o["name"] for o in judged.simulate_post("/v2/models/tiny-test/infer", json=request).json["outputs"]] == \
        ["probabilities"]
    # Binary: one byte per image; and the request's own threshold.
    request["outputs"] = [{"name": "accepted", "parameters": {"binary_data": True}}]
    request["parameters"] = {"min_probability": 0.3}
    resp = judged.simulate_post("/v2/models/tiny-test/infer", json=request)
    head = int(resp.headers["Inference-Header-Content-Length"])
    assert json.loads(resp.content[:head])["outputs"][0]["parameters"] == {"binary_data_size": 3}
    assert list(resp.content[head:]) == [1, 1, 0]
    meta = judged.simulate_get("/v2/models/tiny-test").json
    assert {"name": "accepted", "datatype": "BOOL", "shape": [-1]} in meta["outputs"]


@pytest.fixture(scope="module")
def unjudged(tmp_path_factory):
    """An export made before thresholds existed: probabilities only, no acceptance in the manifest."""
    folder = write_tiny_artifact(tmp_path_factory.mktemp("unjudged") / "artifact", LABELS)
    config = Config(model_dir=folder, inference_workers=1, solo_threads=1)
    metrics = Metrics(CollectorRegistry())
    serving = start_serving(config, metrics)
    yield falcon.testing.TestClient(create_app(config, serving, State(ready=True), metrics))
    serving.close()


def test_without_thresholds_answers_are_not_judged_unless_asked(unjudged):
    """An export that recorded no thresholds is served as before, and says so."""
    client = unjudged
    photo = png(SURE)
    body = client.simulate_post("/predict", body=photo, headers={"Content-Type": "image/png"}).json
    assert body["accepted"] is None and "reason" not in body
    acceptance = client.simulate_get("/metadata").json["acceptance"]
    assert acceptance["enabled"] is False and "no acceptance threshold" in acceptance["reason"]
    asked = client.simulate_post("/predict", body=photo, params={"min_probability": "0.5"},
                                 headers={"Content-Type": "image/png"}).json
    assert asked["accepted"] is (asked["predictions"][0]["probability"] >= 0.5)
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(photo).decode()]}], "outputs": [{"name": "accepted"}]}
    name = client.simulate_get("/metadata").json["name"]
    resp = client.simulate_post(f"/v2/models/{name}/infer", json=request)
    assert resp.status_code == 400 and "needs parameters.min_probability" in resp.json["error"]
    request["parameters"] = {"min_probability": 0.5}
    assert client.simulate_post(f"/v2/models/{name}/infer", json=request).status_code == 200


def test_batch_rows_carry_the_verdict(judged, tmp_path):
    from serve.classify import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, colour in (("sure", SURE), ("unsure", UNSURE), ("unfamiliar", UNFAMILIAR)):
        (folder / f"{name}.png").write_bytes(png(colour))
    model_dir = tmp_path / "models"
    write_tiny_artifact(model_dir, LABELS, acceptance=RULE)
    out = tmp_path / "rows.jsonl"
    assert cli.main([str(folder), str(out), "--model-dir", str(model_dir)]) == 0
    rows = {json.loads(line)["path"]: json.loads(line) for line in out.read_text().splitlines()}
    assert rows["sure.png"]["accepted"] is True and rows["sure.png"]["reason"] is None
    assert rows["unsure.png"]["accepted"] is False and rows["unsure.png"]["reason"].startswith("not one of the 3")
    assert rows["unfamiliar.png"]["accepted"] is False


def test_answer_splits_ranks_and_judges_one_row_in_one_place():
    from serve.manifest import Acceptance
    from serve.postprocess import answer

    labels = ["Audi S4 Sedan 2007", "Audi S4 Sedan 2012", "Volvo 240 Sedan 1993"]
    row = torch.tensor([0.2, 0.7, 0.1, 0.9])  # three probabilities, then the familiarity column
    gate = Acceptance(min_probability=0.5, min_familiarity=0.95)
    got = answer(row, labels, ["familiarity"], gate, k=2)
    assert [r.label for r in got.ranked] == ["Audi S4 Sedan 2012", "Audi S4 Sedan 2007"]
    assert got.predictions() == [{"label": "Audi S4 Sedan 2012", "probability": 0.7},
                                 {"label": "Audi S4 Sedan 2007", "probability": 0.2}]
    assert got.output.familiarity == pytest.approx(0.9)
    assert got.verdict.accepted is False and "does not look like" in got.verdict.reason
    assert answer(row, labels, ["familiarity"], gate, k=1, min_probability=0.8).verdict.accepted is False
    assert answer(row[:3], labels, [], gate, k=1).verdict.accepted is True
