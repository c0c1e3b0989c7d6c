"""The official Triton HTTP client against a real whatcar server: what a V2 user would run."""

import base64
import json
import shutil

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support.paths import ARTIFACTS, SERVE_PYTHON, car_photos
from tests.support.server import Client, start_server

PHOTOS = car_photos()[::6]  # a few photos from every class folder


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(server.address, connection_timeout=30, network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(metadata) -> str:
    return metadata["name"]


def image_input(photos, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(photos)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array([p.read_bytes() for p in photos], dtype=np.object_))
    else:
        # JSON has no bytes type: the server reads each JSON element as a base64 string.
        tensor.set_data_from_numpy(
            np.array([base64.b64encode(p.read_bytes()).decode() for p in photos], dtype=np.object_), binary_data=False)
    return tensor


def parse(entry: bytes) -> tuple[float, int, str]:
    value, index, label = entry.decode().split(":", 2)
    return float(value), int(index), label


def test_health_and_metadata(triton, model, metadata):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(model) and triton.is_model_ready(model, model_version="1")
    server = triton.get_server_metadata()
    assert server["name"] == "whatcar" and "binary_tensor_data" in server["extensions"]
    described = triton.get_model_metadata(model)
    assert described["name"] == model
    inputs = {t["name"]: t for t in described["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES"
    wanted = metadata["input"]
    assert inputs[wanted["name"]]["shape"] == [-1, 3, wanted["height"], wanted["width"]]
    assert {t["name"]: t["shape"] for t in described["outputs"]}["probabilities"] == [-1, metadata["num_classes"]]


def test_unknown_model_is_a_404(triton):
    assert not triton.is_model_ready("no-such-model")
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("no-such-model")
    assert caught.value.status() == "404" and "no-such-model" in caught.value.message()


def test_binary_batch_agrees_with_predict(triton, server, model, metadata):
    """The client's default (binary tensors both ways): one request, one row per photo."""
    k = min(3, metadata["num_classes"])
    result = triton.infer(model, [image_input(PHOTOS)],
                          outputs=[httpclient.InferRequestedOutput("probabilities"),
                                   httpclient.InferRequestedOutput("labels", class_count=k)])
    probabilities = result.as_numpy("probabilities")
    labels = result.as_numpy("labels")
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == probabilities.nbytes
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(PHOTOS), metadata["num_classes"])
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert labels.shape == (len(PHOTOS), k)
    for i, photo in enumerate(PHOTOS):
        expected = server.predict(photo.read_bytes(), top_k=k)["predictions"]
        row = [parse(entry) for entry in labels[i]]
        assert [label for _, _, label in row] == [p["label"] for p in expected]
        assert metadata["classes"][int(probabilities[i].argmax())] == expected[0]["label"]
        for (value, index, label), p in zip(row, expected):
            assert metadata["classes"][index] == label
            assert value == pytest.approx(p["probability"], abs=2e-6)
            assert probabilities[i, index] == pytest.approx(value, abs=1e-6)


def test_json_tensors_give_the_same_answer(triton, model):
    photos = PHOTOS[:2]
    binary = triton.infer(model, [image_input(photos)]).as_numpy("probabilities")
    result = triton.infer(model, [image_input(photos, binary=False)],
                          outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
    assert "parameters" not in result.get_output("probabilities")  # really sent as JSON
    assert np.allclose(result.as_numpy("probabilities"), binary, atol=1e-7)


def test_classification_extension_and_request_parameters(triton, model, metadata):
    result = triton.infer(model, [image_input(PHOTOS[:2])], parameters={"top_k": 1},
                          outputs=[httpclient.InferRequestedOutput("probabilities", class_count=2),
                                   httpclient.InferRequestedOutput("labels")])
    classified, top1 = result.as_numpy("probabilities"), result.as_numpy("labels")
    assert classified.shape == (2, min(2, metadata["num_classes"])) and top1.shape == (2, 1)
    assert [row[0] for row in classified] == [row[0] for row in top1]
    values = [parse(entry)[0] for entry in classified[0]]
    assert values == sorted(values, reverse=True)


def test_preprocessed_pixels_in_both_encodings(triton, model, metadata):
    height, width = metadata["input"]["height"], metadata["input"]["width"]
    pixels = np.random.default_rng(7).integers(0, 256, size=(3, 3, height, width), dtype=np.uint8)
    answers = []
    for binary in (True, False):
        tensor = httpclient.InferInput(metadata["input"]["name"], list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        answers.append(triton.infer(model, [tensor]).as_numpy("probabilities"))
    assert answers[0].shape == (3, metadata["num_classes"])
    assert np.allclose(answers[0], answers[1], atol=1e-7)

    wrong = httpclient.InferInput(metadata["input"]["name"], [1, 3, height, width + 1], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 3, height, width + 1), dtype=np.uint8))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model, [wrong])
    assert caught.value.status() == "400" and f"{width}" in caught.value.message()


def test_a_file_that_is_not_an_image_keeps_its_status(triton, model):
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([PHOTOS[0].read_bytes(), b"plain text"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(model, [tensor])
    assert caught.value.status() == "415" and caught.value.message().startswith("image 1:")


TOKEN = "tritonclient-admin-token-42"


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory):
    """A server with the model repository API on, over a model folder with two versions of the model."""
    models = tmp_path_factory.mktemp("repository") / "models"
    shutil.copytree(ARTIFACTS, models, symlinks=True)
    shutil.copytree(models / "1", models / "2")
    with start_server(models, models.parent / "server.log", "--model-control", "explicit", "--threads", "4",
                      "--inference-workers", "1", environ={"WHATCAR_ADMIN_TOKEN": TOKEN}, python=SERVE_PYTHON) as srv:
        yield Client.of(srv)


def test_model_repository_through_tritonclient(admin_server, model):
    client = httpclient.InferenceServerClient(admin_server.address, connection_timeout=30, network_timeout=300)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert "model_repository" in client.get_server_metadata()["extensions"]
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_repository_index()
        assert caught.value.status() == "401"
        index = client.get_model_repository_index(headers=admin)
        assert [(m["name"], m["version"], m["state"]) for m in index] == [(model, "1", "READY"),
                                                                           (model, "2", "UNAVAILABLE")]

        # Triton's way to ask for one version: a version policy in the load's config.
        client.load_model(model, headers=admin,
                          config=json.dumps({"version_policy": {"specific": {"versions": [2]}}}))
        assert client.is_model_ready(model, model_version="2") and not client.is_model_ready(model, model_version="1")
        result = client.infer(model, [image_input(PHOTOS[:1])])
        assert result.get_response()["model_version"] == "2"

        client.unload_model(model, headers=admin)
        assert not client.is_server_ready()
        client.load_model(model, headers=admin)  # the folder's current version
        assert client.is_model_ready(model, model_version="1")

        with pytest.raises(InferenceServerException) as caught:
            client.load_model(model, headers=admin, config=json.dumps(
                {"version_policy": {"specific": {"versions": ["../1"]}}}))
        assert caught.value.status() == "400"
        assert client.is_model_ready(model, model_version="1")
    finally:
        client.close()
