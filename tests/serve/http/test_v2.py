"""The Open Inference Protocol routes with JSON and hand-built binary bodies, through falcon.testing."""

import base64
import json
import struct

import pytest
import torch

from tests.support.paths import car_photos

PHOTOS = car_photos()[:3]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_input(photos=PHOTOS) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [len(photos)], "data": [b64(p.read_bytes()) for p in photos]}


@pytest.fixture()
def infer_path(handler) -> str:
    return f"/v2/models/{handler.artifact.name}/infer"


def infer(client, path, request, headers=None):
    return client.simulate_post(path, body=json.dumps(request), headers=headers or {"Content-Type": "application/json"})


def output(body: dict, name: str) -> dict:
    (found,) = [o for o in body["outputs"] if o["name"] == name]
    return found


def parse_classification(text: str) -> tuple[float, int, str]:
    value, index, label = text.split(":", 2)
    return float(value), int(index), label


def binary_request(request: dict, blobs: list[bytes]) -> tuple[bytes, dict]:
    head = json.dumps(request).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)),
                                   "Content-Type": "application/octet-stream"}


def split_response(resp) -> tuple[dict, dict[str, bytes]]:
    """The JSON header and each binary output's bytes, per the binary tensor data extension."""
    size = int(resp.headers["Inference-Header-Content-Length"])
    header = json.loads(resp.content[:size])
    blobs, offset = {}, size
    for out in header["outputs"]:
        n = out.get("parameters", {}).get("binary_data_size")
        if n is not None:
            blobs[out["name"]] = resp.content[offset:offset + n]
            offset += n
    assert offset == len(resp.content)
    return header, blobs


def unpack_strings(raw: bytes) -> list[str]:
    out, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        out.append(raw[pos + 4:pos + 4 + n].decode())
        pos += 4 + n
    return out


def test_server_metadata_and_health(client, unloaded):
    body = client.simulate_get("/v2").json
    assert body["name"] == "whatcar" and {"binary_tensor_data", "classification"} <= set(body["extensions"])
    assert client.simulate_get("/v2/health/live").status_code == 200
    assert client.simulate_get("/v2/health/ready").status_code == 200
    assert unloaded.simulate_get("/v2/health/ready").status_code == 503
    assert unloaded.simulate_get("/v2/health/live").status_code == 200


def test_model_metadata_comes_from_the_artifact(client, handler):
    artifact = handler.artifact
    height, width = artifact.input_size
    for path in (f"/v2/models/{artifact.name}", f"/v2/models/{artifact.name}/versions/1"):
        body = client.simulate_get(path).json
        assert body["name"] == artifact.name and body["versions"] == ["1"]
        inputs = {t["name"]: t for t in body["inputs"]}
        assert inputs["image"]["datatype"] == "BYTES"
        assert inputs[artifact.manifest.input_name] == {"name": artifact.manifest.input_name,
                                                            "datatype": "UINT8", "shape": [-1, 3, height, width]}
        outputs = {t["name"]: t for t in body["outputs"]}
        assert outputs["probabilities"] == {"name": "probabilities", "datatype": "FP32",
                                            "shape": [-1, len(artifact.labels)]}


def test_model_readiness_follows_the_server(client, unloaded, handler, infer_path):
    path = f"/v2/models/{handler.artifact.name}/ready"
    assert client.simulate_get(path).status_code == 200
    assert unloaded.simulate_get(path).status_code == 503
    resp = infer(unloaded, infer_path, {"inputs": [image_input(PHOTOS[:1])]})
    assert resp.status_code == 503 and "not loaded" in resp.json["error"]


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/{name}/versions/2",
                                  "/v2/models/{name}/versions/2/ready"])
def test_unknown_model_or_version_is_a_json_404(client, handler, path):
    resp = client.simulate_get(path.format(name=handler.artifact.name))
    assert resp.status_code == 404 and resp.json["error"]
    resp = client.simulate_post("/v2/models/nope/infer", json={"inputs": [image_input(PHOTOS[:1])]})
    assert resp.status_code == 404 and "nope" in resp.json["error"]


def test_json_batch_matches_predict_per_image(client, handler, config, infer_path):
    resp = infer(client, infer_path, {"id": "batch-1", "inputs": [image_input()]})
    assert resp.status_code == 200, resp.text
    body = resp.json
    labels = handler.artifact.labels
    assert body["model_name"] == handler.artifact.name and body["id"] == "batch-1"
    probs = output(body, "probabilities")
    assert probs["datatype"] == "FP32" and probs["shape"] == [len(PHOTOS), len(labels)]
    rows = torch.tensor(probs["data"]).view(len(PHOTOS), len(labels))
    assert torch.allclose(rows.sum(dim=1), torch.ones(len(PHOTOS)), atol=1e-4)
    k = min(config.top_k, len(labels))
    tops = output(body, "labels")
    assert tops["datatype"] == "BYTES" and tops["shape"] == [len(PHOTOS), k]
    for i, photo in enumerate(PHOTOS):
        single = client.simulate_post("/predict", body=photo.read_bytes(), params={"top_k": str(k)},
                                      headers={"Content-Type": "image/jpeg"}).json["predictions"]
        row = [parse_classification(s) for s in tops["data"][i * k:(i + 1) * k]]
        assert [label for _, _, label in row] == [p["label"] for p in single]
        for (value, index, label), p in zip(row, single):
            assert labels[index] == label
            assert value == pytest.approx(p["probability"], abs=2e-6)
            assert float(rows[i, index]) == pytest.approx(value, abs=1e-6)


def test_preprocessed_uint8_input_gives_the_same_probabilities(client, handler, infer_path):
    # One image: as a JSON list of numbers a 288 px image is already about 1 MB of the 2 MB test limit.
    pixels = torch.stack([handler.preprocess(p.read_bytes()) for p in PHOTOS[:1]])
    name = handler.artifact.manifest.input_name
    from_bytes = output(infer(client, infer_path, {"inputs": [image_input(PHOTOS[:1])]}).json, "probabilities")
    resp = infer(client, infer_path, {"inputs": [{"name": name, "datatype": "UINT8", "shape": list(pixels.shape),
                                                  "data": pixels.flatten().tolist()}]})
    assert resp.status_code == 200, resp.text
    assert output(resp.json, "probabilities")["data"] == from_bytes["data"]


def test_binary_extension_both_ways(client, handler, infer_path):
    photos = PHOTOS[:2]
    files = [p.read_bytes() for p in photos]
    packed = b"".join(struct.pack("<I", len(f)) + f for f in files)
    pixels = torch.stack([handler.preprocess(f) for f in files])
    name = handler.artifact.manifest.input_name
    body, headers = binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                                                "parameters": {"binary_data_size": len(packed)}}],
                                    "parameters": {"binary_data_output": True}}, [packed])
    resp = client.simulate_post(infer_path, body=body, headers=headers)
    assert resp.status_code == 200, resp.text
    header, blobs = split_response(resp)
    classes = len(handler.artifact.labels)
    # A model with thresholds answers whether each image is accepted too, and one with makes the make.
    judged = {"accepted"} if handler.artifact.manifest.acceptance else set()
    makes = {"make", "make_probability"} | ({"accepted_level"} if judged else set()) if handler.makes else set()
    assert set(blobs) == {"probabilities", "labels"} | judged | makes
    assert not any("data" in o for o in header["outputs"])
    assert all(len(blobs[name]) == 2 for name in judged)  # one byte per image
    if makes:
        assert len(blobs["make_probability"]) == 2 * 4  # one float32 per image
        assert len(unpack_strings(blobs["make"])) == 2
    values = struct.unpack(f"<{2 * classes}f", blobs["probabilities"])

    raw = bytes(pixels.flatten().tolist())
    body, headers = binary_request({"inputs": [{"name": name, "datatype": "UINT8", "shape": list(pixels.shape),
                                                "parameters": {"binary_data_size": len(raw)}}]}, [raw])
    resp = client.simulate_post(infer_path, body=body, headers=headers)
    assert resp.status_code == 200 and "Inference-Header-Content-Length" not in resp.headers
    assert output(resp.json, "probabilities")["data"] == pytest.approx(list(values), abs=1e-7)
    strings = unpack_strings(blobs["labels"])
    assert strings == output(resp.json, "labels")["data"]


def test_requested_outputs_and_parameters_are_honoured(client, handler, infer_path):
    classes = len(handler.artifact.labels)
    request = {"inputs": [image_input(PHOTOS[:2])], "parameters": {"top_k": 1},
               "outputs": [{"name": "labels", "parameters": {"binary_data": True}}]}
    resp = client.simulate_post(infer_path, body=json.dumps(request))
    header, blobs = split_response(resp)
    assert [o["name"] for o in header["outputs"]] == ["labels"] and header["outputs"][0]["shape"] == [2, 1]
    assert len(unpack_strings(blobs["labels"])) == 2

    k = min(2, classes)
    request = {"inputs": [image_input(PHOTOS[:2])],
               "outputs": [{"name": "probabilities", "parameters": {"classification": k}},
                           {"name": "labels", "parameters": {"top_k": 10_000}}]}
    body = infer(client, infer_path, request).json
    probs, tops = output(body, "probabilities"), output(body, "labels")
    assert probs["datatype"] == "BYTES" and probs["shape"] == [2, k]
    assert tops["shape"] == [2, classes]  # never more than there are classes
    assert probs["data"] == [s for i in range(2) for s in tops["data"][i * classes:i * classes + k]]


def test_bad_images_keep_their_status(client, infer_path, config):
    photo = PHOTOS[0].read_bytes()
    cases = [(b"just some text", 415), (photo[: len(photo) // 2], 400), (b"", 400)]
    for data, status in cases:
        resp = infer(client, infer_path, {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                                      "data": [b64(photo), b64(data)]}]})
        assert resp.status_code == status, resp.text
        assert resp.json["error"].startswith("image 1:")


def test_body_over_the_upload_limit(client, infer_path, config):
    resp = client.simulate_post(infer_path, body=b"{" + b" " * config.max_upload_bytes + b"}")
    assert resp.status_code == 413 and "limit" in resp.json["error"]


def malformed_requests(handler, max_images: int):
    artifact = handler.artifact
    height, width = artifact.input_size
    pixels = artifact.manifest.input_name
    one = image_input(PHOTOS[:1])
    return {
        "not json": b"{oops",
        "not an object": [1, 2],
        "no inputs": {"inputs": []},
        "two inputs": {"inputs": [one, one]},
        "unknown input": {"inputs": [{**one, "name": "photo"}]},
        "wrong datatype": {"inputs": [{**one, "datatype": "UINT8"}]},
        "bad shape": {"inputs": [{**one, "shape": [1, 2]}]},
        "count mismatch": {"inputs": [{**one, "shape": [2]}]},
        "not base64": {"inputs": [{**one, "data": ["***"]}]},
        "not a string": {"inputs": [{**one, "data": [12]}]},
        "no data": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]},
        "batch too large": {"inputs": [{**one, "shape": [max_images + 1], "data": ["AAAA"] * (max_images + 1)}]},
        "pixels wrong size": {"inputs": [{"name": pixels, "datatype": "UINT8", "shape": [1, 3, height + 1, width],
                                          "data": [0] * (3 * (height + 1) * width)}]},
        "pixels out of range": {"inputs": [{"name": pixels, "datatype": "UINT8", "shape": [1, 3, height, width],
                                            "data": [300] * (3 * height * width)}]},
        "pixels too few": {"inputs": [{"name": pixels, "datatype": "UINT8", "shape": [1, 3, height, width],
                                       "data": [0] * 10}]},
        "unknown output": {"inputs": [one], "outputs": [{"name": "logits"}]},
        "output twice": {"inputs": [one], "outputs": [{"name": "labels"}, {"name": "labels"}]},
        "top_k zero": {"inputs": [one], "parameters": {"top_k": 0}},
        "top_k text": {"inputs": [one], "outputs": [{"name": "labels", "parameters": {"top_k": "3"}}]},
        "binary flag not bool": {"inputs": [one], "parameters": {"binary_data_output": "yes"}},
        "id not a string": {"inputs": [one], "id": 7},
    }


def test_malformed_requests_are_json_400s(client, handler, config, infer_path):
    for case, request in malformed_requests(handler, config.max_request_images).items():
        body = request if isinstance(request, bytes) else json.dumps(request)
        resp = client.simulate_post(infer_path, body=body)
        assert resp.status_code == 400, (case, resp.text)
        assert isinstance(resp.json["error"], str) and resp.json["error"], case


def test_malformed_binary_framing(client, infer_path):
    packed = struct.pack("<I", 100) + b"short"
    spec = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(packed)}}
    body, headers = binary_request({"inputs": [spec]}, [packed])
    cases = {
        "element runs past its data": (body, headers),
        "header length past the body": (body, {**headers, "Inference-Header-Content-Length": str(len(body) + 1)}),
        "header length not a number": (body, {**headers, "Inference-Header-Content-Length": "ten"}),
        "bytes nobody claims": binary_request({"inputs": [image_input(PHOTOS[:1])]}, [b"extra"]),
        "size past the end": binary_request({"inputs": [{**spec, "parameters": {"binary_data_size": 10**6}}]}, [b""]),
    }
    for case, (data, hdrs) in cases.items():
        resp = client.simulate_post(infer_path, body=data, headers=hdrs)
        assert resp.status_code == 400, (case, resp.text)
        assert resp.json["error"], case


def test_compressed_body_is_refused(client, infer_path):
    resp = client.simulate_post(infer_path, body=b"\x1f\x8b", headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 415 and "gzip" in resp.json["error"]
