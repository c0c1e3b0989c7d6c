"""The Open Inference Protocol (KServe V2, Triton's HTTP API), so V2 clients can call whatcar.

Routes: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/1],
/v2/models/{name}[/versions/1]/ready and POST /v2/models/{name}[/versions/1]/infer. The model
name is the artifact's (manifest "name"); its version is the one serving (see serve/versions.py).

A request carries exactly one input:
  "image"   BYTES [N] or [N, 1]: encoded image files (JPEG, PNG, WebP, GIF, BMP, TIFF), each
            decoded and preprocessed as /predict does. In JSON each element is a base64 string.
  "images"  UINT8 [N, 3, H, W]: RGB pixels already preprocessed to the manifest's input size.
and gets back the outputs it asks for (both when it names none):
  "probabilities"  FP32 [N, classes]. With parameters.classification = k (Triton's
            classification extension) it becomes BYTES [N, k] instead, as "labels" below.
  "labels"  BYTES [N, k]: the k most likely classes of each image, the named model first (as
            /predict's "predictions"), each
            "<probability>:<index>:<label>" (Triton's classification strings, probability with
            six decimals). k is the output's parameters.top_k (or classification), else the
            request's parameters.top_k, else the server's --top-k; never more than the classes.
  "accepted"  BOOL [N]: whether each image's named model counts as an answer, as /predict's
            "accepted" (a default output only for models exported with a threshold; the
            request's parameters.min_probability overrides the threshold, as /predict's
            ?min_probability= does, and makes the output available for any model).
  "accepted_level"  BYTES [N]: "model", "make" or "" (turned away), as /predict's
            "accepted_level"; available where "accepted" is and the classes carry makes.
  "make", "make_probability"  BYTES [N] and FP32 [N]: each image's most likely make and its
            probability, as /predict's "make" (only for models whose classes carry makes).

Both JSON tensors and the binary tensor data extension are understood: binary inputs follow
the JSON header (`Inference-Header-Content-Length`), in input order, sized by each input's
parameters.binary_data_size; an output is binary when its parameters.binary_data is true, or
when the request's parameters.binary_data_output is and the output does not say otherwise.
BYTES elements in binary form are each a 4-byte little-endian length, then the bytes.
Errors answer {"error": "..."}: 400 for a malformed request, 404 for an unknown model or
version, 413 over --max-upload-bytes (the whole body), the decoder's own 4xx for bad images,
503 while not ready.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

import falcon
import torch

from .config import Config
from .errors import ImageRejected
from .handler import Handler, Options
from .live_model import LiveModel, NotServing, NotThisModel, check_identity
from .metrics import Metrics
from .postprocess import Answer, clamp_k, rank
from .upload import read_body

SERVER_NAME = "whatcar"
# Version of this V2 front end; changes when its inputs or outputs change.
SERVER_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
PROBABILITIES = "probabilities"
LABELS = "labels"
ACCEPTED = "accepted"
ACCEPTED_LEVEL = "accepted_level"
MAKE = "make"
MAKE_PROBABILITY = "make_probability"
MAX_NESTING = 6


class V2Error(Exception):
    """Answered as the protocol's error object, with its own status (and headers, if any)."""

    def __init__(self, status: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def handle_error(req, resp, exc: V2Error, params) -> None:
    resp.status = exc.status
    resp.set_headers(exc.headers)
    resp.media = {"error": exc.message}


def bad(message: str) -> V2Error:
    return V2Error(falcon.HTTP_400, message)


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: object = None  # the JSON "data", when not binary
    raw: bytes | None = None  # the binary extension's bytes, when binary

    @property
    def count(self) -> int:
        total = 1
        for dim in self.shape:
            total *= dim
        return total


def is_int(value) -> bool:
    return type(value) is int  # bool is an int subclass, and never a count


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        return body, b""
    try:
        size = int(header_length)
    except ValueError:
        raise bad(f"{HEADER_LENGTH} must be an integer (got {header_length!r})") from None
    if not 0 <= size <= len(body):
        raise bad(f"{HEADER_LENGTH} is {size} but the body is {len(body)} bytes")
    return body[:size], body[size:]


def parse_header(data: bytes) -> dict:
    try:
        request = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise bad("the inference request must be a JSON object")
    if not isinstance(request.get("parameters", {}), dict):
        raise bad("'parameters' must be an object")
    if "id" in request and not isinstance(request["id"], str):
        raise bad("'id' must be a string")
    return request


def parse_inputs(request: dict, binary: bytes) -> list[Tensor]:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad("'inputs' must be a non-empty list of tensors")
    tensors, offset = [], 0
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise bad(f"inputs[{i}] must be an object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise bad(f"inputs[{i}] needs a string 'name' and 'datatype'")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise bad(f"input '{name}': 'shape' must be a list of non-negative integers")
        params = spec.get("parameters", {})
        if not isinstance(params, dict):
            raise bad(f"input '{name}': 'parameters' must be an object")
        tensor = Tensor(name, datatype, shape)
        size = params.get("binary_data_size")
        if size is not None:
            if not is_int(size) or size < 0:
                raise bad(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise bad(f"input '{name}': binary_data_size {size} runs past the end of the body")
            tensor.raw = binary[offset:offset + size]
            offset += size
        elif "data" in spec:
            tensor.data = spec["data"]
        else:
            raise bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        tensors.append(tensor)
    if offset != len(binary):
        raise bad(f"{len(binary) - offset} bytes after the JSON header belong to no input's binary_data_size")
    return tensors


def flatten(data, depth: int = 0):
    """Row-major elements of JSON tensor data, which may be flat or nested."""
    if isinstance(data, list):
        if depth > MAX_NESTING:
            raise bad("tensor data is nested too deeply")
        for item in data:
            yield from flatten(item, depth + 1)
    else:
        yield data


def unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    """BYTES elements in binary form: each a 4-byte little-endian length, then that many bytes."""
    elements, pos, view = [], 0, memoryview(raw)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad(f"input '{name}': binary BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise bad(f"input '{name}': a BYTES element of {length} bytes runs past the end of its data")
        elements.append(bytes(view[pos:pos + length]))
        pos += length
    return elements


def pack_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


class InferRequest:
    """A parsed, validated inference request: the pixels to score and the outputs to send."""

    def __init__(self, request: dict, tensors: list[Tensor], handler: Handler, config: Config):
        self.handler, self.config = handler, config
        self.id = request.get("id")
        self.params = request.get("parameters", {})
        names = {IMAGE_INPUT, self.pixels_name}
        if len(tensors) != 1 or tensors[0].name not in names:
            got = ", ".join(repr(t.name) for t in tensors)
            raise bad(f"send exactly one input, '{IMAGE_INPUT}' (BYTES, encoded images) or "
                      f"'{self.pixels_name}' (UINT8 [N, 3, H, W]); got {got}")
        self.input = tensors[0]
        self.min_probability = self.threshold()
        self.outputs = self.requested_outputs(request.get("outputs"))

    @property
    def pixels_name(self) -> str:
        return self.handler.artifact.manifest.input_name

    def check_batch(self, n: int) -> None:
        if not 1 <= n <= self.config.max_request_images:
            raise bad(f"input '{self.input.name}': batch of {n}; send 1 to {self.config.max_request_images} images")

    def images(self) -> list[bytes]:
        """The encoded image files of a BYTES input."""
        tensor = self.input
        if tensor.datatype != "BYTES":
            raise bad(f"input '{IMAGE_INPUT}' must be BYTES (got {tensor.datatype})")
        if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
            raise bad(f"input '{IMAGE_INPUT}': shape must be [N] or [N, 1] (got {tensor.shape})")
        self.check_batch(tensor.shape[0])
        if tensor.raw is not None:
            elements = unpack_bytes(tensor.raw, tensor.name)
        else:
            elements = []
            for item in flatten(tensor.data):
                if not isinstance(item, str):
                    raise bad(f"input '{IMAGE_INPUT}': in JSON each image must be a base64 string")
                try:
                    elements.append(base64.b64decode(item, validate=True))
                except binascii.Error:
                    raise bad(f"input '{IMAGE_INPUT}': element {len(elements)} is not valid base64") from None
        if len(elements) != tensor.count:
            raise bad(f"input '{IMAGE_INPUT}': shape {tensor.shape} needs {tensor.count} elements, "
                      f"got {len(elements)}")
        return elements

    def pixels(self) -> list[torch.Tensor]:
        """The uint8 [3, H, W] images of a UINT8 [N, 3, H, W] input, checked against the model's input size."""
        tensor = self.input
        height, width = self.handler.artifact.manifest.input_size
        if tensor.datatype != "UINT8":
            raise bad(f"input '{tensor.name}' must be UINT8 (got {tensor.datatype})")
        if len(tensor.shape) != 4 or tensor.shape[1:] != [3, height, width]:
            raise bad(f"input '{tensor.name}': shape must be [N, 3, {height}, {width}] (got {tensor.shape})")
        self.check_batch(tensor.shape[0])
        if tensor.raw is not None:
            if len(tensor.raw) != tensor.count:
                raise bad(f"input '{tensor.name}': shape {tensor.shape} needs {tensor.count} bytes, "
                          f"got {len(tensor.raw)}")
            flat = torch.frombuffer(bytearray(tensor.raw), dtype=torch.uint8)
        else:
            values = list(flatten(tensor.data))
            if len(values) != tensor.count:
                raise bad(f"input '{tensor.name}': shape {tensor.shape} needs {tensor.count} values, "
                          f"got {len(values)}")
            if not all(is_int(v) and 0 <= v <= 255 for v in values):
                raise bad(f"input '{tensor.name}': UINT8 values must be integers from 0 to 255")
            flat = torch.tensor(values, dtype=torch.uint8)
        return list(flat.view(tensor.shape))

    def items(self) -> list:
        """What to score: the encoded files of an 'image' input, or the pixels of a UINT8 one."""
        return self.images() if self.input.name == IMAGE_INPUT else self.pixels()

    def threshold(self) -> float | None:
        value = self.params.get("min_probability")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 1):
            raise bad(f"parameters.min_probability must be a number from 0 to 1 (got {value!r})")
        return value

    def available_outputs(self) -> list[str]:
        judged = self.handler.artifact.acceptance is not None or self.min_probability is not None
        makes = self.handler.makes is not None
        # The level says more than "accepted" only where the make can be the answer.
        return [PROBABILITIES, LABELS] + ([ACCEPTED] if judged else []) + \
            ([ACCEPTED_LEVEL] if judged and makes else []) + ([MAKE, MAKE_PROBABILITY] if makes else [])

    def requested_outputs(self, outputs) -> list[tuple[str, bool, int | None]]:
        """(name, binary, k) for each output to send; k is None for raw probabilities."""
        available = self.available_outputs()
        if outputs is None:
            outputs = [{"name": name} for name in available]
        if not isinstance(outputs, list):
            raise bad("'outputs' must be a list")
        chosen, seen = [], set()
        for i, spec in enumerate(outputs):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise bad(f"outputs[{i}] must be an object with a string 'name'")
            name, params = spec["name"], spec.get("parameters", {})
            if name not in available:
                hint = (f"; '{name}' needs parameters.min_probability with this model"
                        if name in (ACCEPTED, ACCEPTED_LEVEL) else "")
                raise bad(f"unknown output '{name}'; this model has {', '.join(repr(a) for a in available)}{hint}")
            if name in seen:
                raise bad(f"output '{name}' is requested twice")
            if not isinstance(params, dict):
                raise bad(f"output '{name}': 'parameters' must be an object")
            seen.add(name)
            chosen.append((name, self.binary(params, name), self.top_k(params, name)))
        return chosen

    def binary(self, params: dict, name: str) -> bool:
        default = self.params.get("binary_data_output", False)
        if not isinstance(default, bool):
            raise bad("parameters.binary_data_output must be true or false")
        value = params.get("binary_data", default)
        if not isinstance(value, bool):
            raise bad(f"output '{name}': binary_data must be true or false")
        return value

    def count(self, value, what: str) -> int:
        if not is_int(value) or value < 1:
            raise bad(f"{what} must be a positive integer (got {value!r})")
        return clamp_k(value, len(self.handler.artifact.labels))

    def top_k(self, params: dict, name: str) -> int | None:
        """How many classes a classification output holds, or None for the raw probabilities."""
        if "classification" in params:
            return self.count(params["classification"], f"output '{name}': parameters.classification")
        if name != LABELS:
            return None
        if "top_k" in params:
            return self.count(params["top_k"], f"output '{name}': parameters.top_k")
        if "top_k" in self.params:
            return self.count(self.params["top_k"], "parameters.top_k")
        return clamp_k(self.config.top_k, len(self.handler.artifact.labels))


def classifications(answers: list[Answer], labels: list[str], k: int) -> list[bytes]:
    """Triton's classification strings, "<probability>:<index>:<label>", k per image, row after row;
    each image's named model first, as /predict ranks them."""
    return [f"{r.probability:.6f}:{r.index}:{r.label}".encode() for a in answers
            for r in rank(a.probabilities, labels, k, first=a.ranked[0].index)]


def response_outputs(infer: InferRequest, answers: list[Answer]) -> tuple[list[dict], list[bytes]]:
    """Each requested output as its JSON entry, plus the binary blobs in the same order."""
    entries, blobs = [], []
    probabilities = torch.stack([a.probabilities for a in answers])
    n = probabilities.shape[0]
    for name, binary, k in infer.outputs:
        if name == ACCEPTED:
            entry = {"name": name, "datatype": "BOOL", "shape": [n]}
            values = [bool(a.verdict.accepted) for a in answers]
            blob = bytes(values) if binary else None  # one byte per element
        elif name in (ACCEPTED_LEVEL, MAKE):
            entry = {"name": name, "datatype": "BYTES", "shape": [n]}
            strings = [((a.verdict.level or "") if name == ACCEPTED_LEVEL else a.make.label).encode("utf-8")
                       for a in answers]
            values = [s.decode("utf-8") for s in strings]
            blob = pack_bytes(strings) if binary else None
        elif name == MAKE_PROBABILITY:
            entry = {"name": name, "datatype": "FP32", "shape": [n]}
            values = [a.make.probability for a in answers]
            blob = struct.pack(f"<{n}f", *values) if binary else None
        elif k is None:
            entry = {"name": name, "datatype": "FP32", "shape": list(probabilities.shape)}
            values = probabilities.reshape(-1).tolist()
            blob = struct.pack(f"<{len(values)}f", *values) if binary else None
        else:
            entry = {"name": name, "datatype": "BYTES", "shape": [n, k]}
            strings = classifications(answers, infer.handler.artifact.labels, k)
            values = [s.decode("utf-8") for s in strings]
            blob = pack_bytes(strings) if binary else None
        if binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values
        entries.append(entry)
    return entries, blobs


class ModelScope:
    """What every model route shares: the served model, its name and version checks, readiness."""

    def __init__(self, serving: LiveModel, state):
        self.serving, self.state = serving, state

    def check(self, name: str, version: str | None) -> Handler:
        """The live handler, if `name` (and `version`, when given) are what it serves; for facts
        only: inference takes a lease, which checks again."""
        handler = self.serving.current
        if handler is None:
            raise V2Error(falcon.HTTP_503, f"model '{name}' is not loaded")
        try:
            check_identity(handler.artifact, name, version)
        except NotThisModel as exc:
            raise V2Error(falcon.HTTP_404, str(exc)) from None
        return handler

    @property
    def ready(self) -> bool:
        return self.state.ready and self.serving.current is not None


class ServerMetadataResource:
    def __init__(self, extensions: list[str]):
        self.extensions = extensions

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": self.extensions}


class LiveResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"live": True}


class ServerReadyResource:
    def __init__(self, scope: ModelScope):
        self.scope = scope

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready = self.scope.ready
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"ready": ready}


class ModelMetadataResource:
    def __init__(self, scope: ModelScope):
        self.scope = scope

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        handler = self.scope.check(name, version)
        artifact = handler.artifact
        height, width = artifact.manifest.input_size
        resp.media = {
            "name": artifact.name,
            "versions": [artifact.version],
            # What runs it here: the artifact's compiled package, or its TorchScript module.
            "platform": "pytorch_aotinductor" if artifact.runtime.name == "compiled" else "pytorch_torchscript",
            "inputs": [
                {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": artifact.manifest.input_name, "datatype": "UINT8", "shape": [-1, 3, height, width]},
            ],
            "outputs": [
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(artifact.labels)]},
                {"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]},
                *([{"name": ACCEPTED, "datatype": "BOOL", "shape": [-1]}] if artifact.acceptance else []),
                *([{"name": ACCEPTED_LEVEL, "datatype": "BYTES", "shape": [-1]}]
                  if artifact.acceptance and handler.makes else []),
                *([{"name": MAKE, "datatype": "BYTES", "shape": [-1]},
                   {"name": MAKE_PROBABILITY, "datatype": "FP32", "shape": [-1]}] if handler.makes else []),
            ],
        }


class ModelReadyResource:
    def __init__(self, scope: ModelScope):
        self.scope = scope

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        self.scope.check(name, version)
        ready = self.scope.ready
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"name": name, "ready": ready}


class InferResource:
    def __init__(self, scope: ModelScope, config: Config, metrics: Metrics):
        self.scope, self.config, self.metrics = scope, config, metrics

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        self.scope.check(name, version)
        if not self.scope.state.ready:
            raise V2Error(falcon.HTTP_503, "model is not ready")
        encoding = (req.get_header("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise V2Error(falcon.HTTP_415, f"Content-Encoding {encoding!r} is not supported; send the body as is")
        try:
            body = read_body(req, self.config.max_upload_bytes)
        except ImageRejected as exc:
            self.metrics.observe_rejection(exc)
            raise V2Error(exc.status, exc.description) from None
        header, binary = split_body(body, req.get_header(HEADER_LENGTH))
        request = parse_header(header)
        try:
            with self.scope.serving.lease(name, version) as handler:
                infer = InferRequest(request, parse_inputs(request, binary), handler, self.config)
                # The request succeeds or fails as a whole, so one bad image keeps the rest from the model.
                # top_k only shapes the ranked classes, which the classification outputs rank per output themselves.
                prediction = handler.predict(infer.items(), Options(1, infer.min_probability, all_or_nothing=True))
        except NotServing:
            raise V2Error(falcon.HTTP_503, f"model '{name}' is not loaded") from None
        except NotThisModel as exc:
            raise V2Error(falcon.HTTP_404, str(exc)) from None
        rejected = prediction.rejected
        if rejected is not None:
            self.metrics.observe_rejection(rejected)
            raise V2Error(rejected.status, f"image {prediction.answers.index(rejected)}: {rejected.description}")
        self.metrics.observe_queue(prediction.queue)
        entries, blobs = response_outputs(infer, prediction.answers)
        # The version that scored this request, even if another has been loaded since.
        artifact = handler.artifact
        answer = {"model_name": artifact.name, "model_version": artifact.version, "outputs": entries}
        if infer.id is not None:
            answer["id"] = infer.id
        head = json.dumps(answer).encode("utf-8")
        if blobs:
            resp.set_header(HEADER_LENGTH, str(len(head)))
            resp.content_type = "application/octet-stream"
            resp.data = head + b"".join(blobs)
        else:
            resp.content_type = falcon.MEDIA_JSON
            resp.data = head


def register(app: falcon.App, config: Config, serving: LiveModel, state, metrics: Metrics) -> None:
    """Add the V2 routes and their error format to `app`."""
    app.add_error_handler(V2Error, handle_error)
    scope = ModelScope(serving, state)
    model, ready, infer = ModelMetadataResource(scope), ModelReadyResource(scope), InferResource(scope, config, metrics)
    extensions = EXTENSIONS + (["model_repository"] if config.model_control == "explicit" else [])
    app.add_route("/v2", ServerMetadataResource(extensions))
    app.add_route("/v2/health/live", LiveResource())
    app.add_route("/v2/health/ready", ServerReadyResource(scope))
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_route(prefix, model)
        app.add_route(prefix + "/ready", ready)
        app.add_route(prefix + "/infer", infer)
