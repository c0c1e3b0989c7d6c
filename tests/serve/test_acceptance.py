"""The "unknown" answer: whether a top class counts as an answer, and when only its make does, in
/predict, /v2, /metadata and the batch rows; and an export without thresholds, which is served
unjudged."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import falcon.testing
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from serve.app import State, create_app, start_serving
from serve.artifact import load_artifact
from serve.config import Config
from serve.errors import ArtifactError
from serve.manifest import Acceptance, CarClass
from serve.metrics import Metrics
from serve.postprocess import MAKE, MODEL, Makes, Output, judge, named_classes, with_article
from tests.support.tiny_artifact import write_tiny_artifact

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


def serving_client(folder):
    """A test client of an app serving the artifact in `folder`, closed when the fixture ends."""
    config = Config(model_dir=folder, inference_workers=1, solo_threads=1)
    metrics = Metrics(CollectorRegistry())
    serving = start_serving(config, metrics)
    yield falcon.testing.TestClient(create_app(config, serving, State(ready=True), metrics))
    serving.close()


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    yield from serving_client(write_tiny_artifact(tmp_path_factory.mktemp("judged") / "artifact", LABELS,
                                                  acceptance=RULE))


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
    assert acceptance == {"enabled": True, "min_probability": 0.6, "min_familiarity": 0.1,
                          "min_make_probability": None, "rule": "test rule",
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
    yield from serving_client(write_tiny_artifact(tmp_path_factory.mktemp("unjudged") / "artifact", LABELS))


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


def classify_three_photos(tmp_path, out_name: str, **artifact) -> Path:
    """`make classify` over a sure, an unsure and an unfamiliar photo with a tiny model; its output."""
    from serve.classify import cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, colour in (("sure", SURE), ("unsure", UNSURE), ("unfamiliar", UNFAMILIAR)):
        (folder / f"{name}.png").write_bytes(png(colour))
    model_dir = tmp_path / "models"
    write_tiny_artifact(model_dir, **artifact)
    out = tmp_path / out_name
    assert cli.main([str(folder), str(out), "--model-dir", str(model_dir)]) == 0
    return out


def test_batch_rows_carry_the_verdict(judged, tmp_path):
    out = classify_three_photos(tmp_path, "rows.jsonl", labels=LABELS, acceptance=RULE)
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


# ---------------------------------------------------------------------- the make, as an answer of its own

MAKE_LABELS = ["Alpha Coupe 2001", "Alpha Van 2002", "Gamma Sedan 2003"]
MAKE_CLASSES = [{"label": label, "name": label, "make": label.split()[0], "model": label.split()[1],
                 "body": None, "year": int(label.split()[-1])} for label in MAKE_LABELS]
# UNSURE gives the two Alpha classes about 0.41 and 0.31: no model reaches 0.6, their make 0.72 does.
MAKE_RULE = {**RULE, "min_make_probability": 0.65}


def cars(labels: list[str], makes: list[str]) -> list[CarClass]:
    return [CarClass(label, label, make, label, None, None) for label, make in zip(labels, makes)]


def test_make_probabilities_are_sums_over_each_makes_models():
    makes = Makes.of(cars(["a1", "b1", "a2", "c1"], ["A", "B", "A", "C"]))
    assert makes.names == ["A", "B", "C"]
    assert makes.probabilities(torch.tensor([0.3, 0.35, 0.25, 0.1])).tolist() == pytest.approx([0.55, 0.35, 0.1])
    # The top make can differ from the top model's make: B's one model beats each of A's, not their sum.
    top = makes.top(torch.tensor([0.3, 0.35, 0.25, 0.1]))
    assert (top.label, top.probability) == ("A", pytest.approx(0.55))


def test_an_answer_names_the_most_likely_model_of_the_most_likely_make():
    from serve.postprocess import answer, rank

    labels = ["a1", "b1", "a2", "c1"]
    makes = Makes.of(cars(labels, ["A", "B", "A", "C"]))
    split = torch.tensor([0.3, 0.35, 0.25, 0.1])  # b1 is the likeliest class, A (0.55) the likeliest make
    assert int(named_classes(split, makes)) == 0 and int(named_classes(split, None)) == 1
    # Row by row in a batch, as the export measures it; one class over half wins either way.
    rows = torch.stack([split, torch.tensor([0.1, 0.6, 0.2, 0.1])])
    assert named_classes(rows, makes).tolist() == [0, 1]
    rule = Acceptance(0.6, None, min_make_probability=0.5)
    got = answer(split, labels, [], rule, k=3, makes=makes)
    assert [r.label for r in got.ranked] == ["a1", "b1", "a2"]  # the named model leads, then by probability
    assert got.make.label == "A" and got.verdict.level == MAKE
    assert got.verdict.reason == "an A; not sure which model (closest: a1)"
    # Judged on the named model's probability: 0.3 is short of 0.35, the likeliest class's.
    assert answer(split, labels, [], Acceptance(0.32, None), k=1, makes=makes).verdict.accepted is False
    assert answer(split, labels, [], Acceptance(0.32, None), k=1).verdict.accepted is True  # no makes: argmax
    sure = answer(rows[1], labels, [], rule, k=2, makes=makes)
    assert [r.label for r in sure.ranked] == ["b1", "a2"] and sure.verdict.level == MODEL
    # A named class outside the k likeliest still leads, and k holds.
    assert [r.label for r in rank(split, labels, 2, first=3)] == ["c1", "b1"]
    assert rank(split, labels, 2, first=1) == rank(split, labels, 2)
    # /v2's classification strings lead with the same model.
    from serve.v2 import classifications
    assert classifications([got, sure], labels, 2) == [b"0.300000:0:a1", b"0.350000:1:b1",
                                                       b"0.600000:1:b1", b"0.200000:2:a2"]


def test_a_batch_of_rows_is_summed_row_by_row_as_the_export_fits_the_make_threshold():
    makes = Makes.of(cars(["c1", "a1", "c2", "b1"], ["C", "A", "C", "B"]))
    rows = torch.tensor([[0.1, 0.15, 0.35, 0.4], [0.5, 0.2, 0.3, 0.0]])
    sums = makes.probabilities(rows)
    assert sums.shape == (2, 3) and torch.allclose(sums, torch.tensor([[0.45, 0.15, 0.4], [0.8, 0.2, 0.0]]))
    # Each row as the server sums it alone.
    assert all(torch.allclose(sums[i], makes.probabilities(rows[i])) for i in range(2))
    # The top make need not be the top class's: B's one class has 0.4, C's two 0.1 + 0.35.
    assert sums.max(dim=1).indices.tolist() == [0, 0]


def test_below_the_model_threshold_a_sure_make_is_the_answer():
    rule = Acceptance(0.6, 0.1, min_make_probability=0.65)
    makes = Makes.of(cars(MAKE_LABELS, ["Rolls-Royce", "Rolls-Royce", "Audi"]))
    probabilities = torch.tensor([0.45, 0.35, 0.2])
    verdict = judge(Output(probabilities, 0.5), rule, MAKE_LABELS, make=makes.top(probabilities))
    assert (verdict.accepted, verdict.level) == (False, MAKE)
    assert verdict.reason == "a Rolls-Royce; not sure which model (closest: Alpha Coupe 2001)"
    # Sure of the model: the model level, whatever the make.
    sure = torch.tensor([0.7, 0.1, 0.2])
    assert judge(Output(sure, 0.5), rule, MAKE_LABELS, make=makes.top(sure)) == judge(Output(sure, 0.5), rule,
                                                                                        MAKE_LABELS)
    assert judge(Output(sure, 0.5), rule, MAKE_LABELS).level == MODEL
    # Neither sure enough: turned away, as are unfamiliar photos whatever their make.
    spread = torch.tensor([0.3, 0.3, 0.4])
    assert judge(Output(spread, 0.5), rule, MAKE_LABELS, make=makes.top(spread)).level is None
    assert judge(Output(probabilities, 0.05), rule, MAKE_LABELS, make=makes.top(probabilities)).level is None
    # Without a make threshold (an export before makes) there is no make level.
    assert judge(Output(probabilities, 0.5), Acceptance(0.6, 0.1), MAKE_LABELS,
                 make=makes.top(probabilities)).level is None


def test_makes_are_named_with_their_article():
    assert [with_article(m) for m in ("Audi", "AM General", "BMW", "Rolls-Royce", "Infiniti")] == \
        ["an Audi", "an AM General", "a BMW", "a Rolls-Royce", "an Infiniti"]


@pytest.fixture(scope="module")
def with_makes(tmp_path_factory):
    yield from serving_client(write_tiny_artifact(tmp_path_factory.mktemp("makes") / "artifact", MAKE_LABELS,
                                                  acceptance=MAKE_RULE, classes=MAKE_CLASSES))


def test_predict_gives_the_make_and_the_level_it_accepted_at(with_makes):
    sure = predict(with_makes, SURE).json
    assert (sure["accepted"], sure["accepted_level"]) == (True, "model")
    assert sure["make"]["label"] == "Alpha"
    assert sure["make"]["probability"] == pytest.approx(sum(p["probability"] for p in sure["predictions"]
                                                            if p["label"].startswith("Alpha")), abs=2e-6)
    unsure = predict(with_makes, UNSURE).json
    assert (unsure["accepted"], unsure["accepted_level"]) == (False, "make")
    assert unsure["make"]["label"] == "Alpha" and unsure["make"]["probability"] >= 0.65
    assert unsure["reason"].startswith("an Alpha; not sure which model")
    unfamiliar = predict(with_makes, UNFAMILIAR).json
    assert (unfamiliar["accepted"], unfamiliar["accepted_level"]) == (False, None)
    assert "make" in unfamiliar  # the make is still said, as the ranked models are


def test_models_without_makes_answer_as_before(judged):
    body = predict(judged, SURE).json
    assert "make" not in body and body["accepted_level"] == "model"


def test_metadata_lists_the_classes_with_their_fields_and_the_makes(with_makes):
    meta = with_makes.simulate_get("/metadata").json
    assert meta["classes"] == MAKE_LABELS  # unchanged for existing clients
    assert meta["class_fields"] == MAKE_CLASSES and meta["makes"] == ["Alpha", "Gamma"]
    assert meta["acceptance"]["min_make_probability"] == 0.65


def test_v2_returns_the_make_and_the_level_as_extra_outputs(with_makes):
    images = [base64.b64encode(png(c)).decode() for c in (SURE, UNSURE, UNFAMILIAR)]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": images}]}
    answer = with_makes.simulate_post("/v2/models/tiny-test/infer", json=request).json
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["accepted_level"]["data"] == ["model", "make", ""]
    assert outputs["make"]["data"] == ["Alpha", "Alpha", "Alpha"]
    assert outputs["make_probability"]["datatype"] == "FP32" and outputs["make_probability"]["shape"] == [3]
    assert outputs["make_probability"]["data"][1] >= 0.65
    meta = with_makes.simulate_get("/v2/models/tiny-test").json
    assert {"name": "make", "datatype": "BYTES", "shape": [-1]} in meta["outputs"]


def test_batch_rows_carry_the_make_and_the_summary_counts_each_level(tmp_path, capsys):
    out = classify_three_photos(tmp_path, "rows.csv", labels=MAKE_LABELS, acceptance=MAKE_RULE, classes=MAKE_CLASSES)
    import csv
    rows = {r["path"]: r for r in csv.DictReader(out.read_text().splitlines())}
    assert rows["unsure.png"]["accepted_level"] == "make" and rows["unsure.png"]["make"] == "Alpha"
    assert rows["sure.png"]["accepted_level"] == "model" and rows["unfamiliar.png"]["accepted_level"] == ""
    assert "named the model for 1, only the make for 1, turned away 1" in capsys.readouterr().err


def test_classes_that_do_not_match_the_labels_are_refused(tmp_path):
    swapped = [MAKE_CLASSES[1], MAKE_CLASSES[0], MAKE_CLASSES[2]]
    folder = write_tiny_artifact(tmp_path / "swapped", MAKE_LABELS, classes=swapped)
    with pytest.raises(ArtifactError, match="classes\\[0\\] is 'Alpha Van 2002' but line 1 of the labels file"):
        load_artifact(folder)
    folder = write_tiny_artifact(tmp_path / "short", MAKE_LABELS, classes=MAKE_CLASSES[:2])
    with pytest.raises(ArtifactError, match="'classes' must list one entry for each of the 3"):
        load_artifact(folder)
    folder = write_tiny_artifact(tmp_path / "no-classes", MAKE_LABELS, acceptance=MAKE_RULE)
    with pytest.raises(ArtifactError, match="min_make_probability but no 'classes'"):
        load_artifact(folder)
