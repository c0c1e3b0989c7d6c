"""An OpenAPI 3.1 description of whatcar's HTTP API, served at /openapi.json.

Written by hand next to the routes it describes; a test holds it and create_app's router to
the same set of paths and methods, so neither can drift without the other.
"""

from __future__ import annotations

import json

import falcon

from .config import Config
from .decode import ACCEPTED_MEDIA_TYPES
from .live_model import LiveModel

ERROR = {"$ref": "#/components/schemas/Error"}
V2_ERROR = {"$ref": "#/components/schemas/V2Error"}


def json_response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def error(description: str) -> dict:
    return json_response(description, ERROR)


def v2_error(description: str) -> dict:
    return json_response(description, V2_ERROR)


def predict_operation(config: Config, summary: str, operation_id: str) -> dict:
    binary = {"schema": {"type": "string", "format": "binary"}}
    raw_types = {media: binary for media in (*ACCEPTED_MEDIA_TYPES, "application/octet-stream")}
    return {
        "summary": summary,
        "operationId": operation_id,
        "tags": ["predict"],
        "parameters": [{"name": "top_k", "in": "query", "required": False,
                        "description": f"how many classes to return (default {config.top_k})",
                        "schema": {"type": "integer", "minimum": 1}},
                       {"name": "min_probability", "in": "query", "required": False,
                        "description": "accept the top class only at this probability or above, instead of the "
                                       "model's own threshold (GET /metadata, acceptance)",
                        "schema": {"type": "number", "minimum": 0, "maximum": 1}}],
        "requestBody": {
            "required": True,
            "description": f"one image, raw or as the multipart field 'file'; at most {config.max_upload_bytes} "
                           f"bytes and {config.max_image_pixels} pixels",
            "content": {**raw_types, "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}}},
        },
        "responses": {
            "200": json_response("the most likely makes and models", {"$ref": "#/components/schemas/Prediction"}),
            "400": error("empty, undecodable or malformed upload, or a bad top_k or min_probability"),
            "413": error("body over the upload limit"),
            "415": error("not an image type whatcar reads"),
            "422": error("image over the pixel limit"),
            "503": error("model not ready (starting or draining)"),
        },
    }


def static_operation(summary: str, media_type: str) -> dict:
    return {"summary": summary, "tags": ["page"],
            "responses": {"200": {"description": summary, "content": {media_type: {"schema": {"type": "string"}}}}}}


def build_spec(config: Config, serving: LiveModel) -> dict:
    handler = serving.current
    if handler is None:
        return {"openapi": "3.1.0", "info": {"title": "whatcar", "version": "1",
                                            "description": "No model is loaded; load one to see the full description."},
                "paths": {}}
    artifact = handler.artifact
    height, width = artifact.manifest.input_size
    name_param = {"name": "name", "in": "path", "required": True, "description": "the model name",
                  "schema": {"type": "string", "example": artifact.name}}
    version_param = {"name": "version", "in": "path", "required": True, "description": "the model version",
                     "schema": {"type": "string", "enum": [artifact.version]}}

    def model_ops(versioned: bool) -> dict[str, dict]:
        params = [name_param, version_param] if versioned else [name_param]
        suffix = " (explicit version)" if versioned else ""
        return {
            "": {"get": {"summary": "V2 model metadata" + suffix, "tags": ["v2"], "parameters": params,
                         "responses": {"200": json_response("inputs and outputs of the model",
                                                            {"$ref": "#/components/schemas/V2ModelMetadata"}),
                                       "404": v2_error("unknown model or version")}}},
            "/ready": {"get": {"summary": "V2 model readiness" + suffix, "tags": ["v2"], "parameters": params,
                               "responses": {"200": {"description": "ready"},
                                             "404": v2_error("unknown model or version"),
                                             "503": {"description": "not ready"}}}},
            "/infer": {"post": {
                "summary": "V2 inference" + suffix, "tags": ["v2"], "parameters": params,
                "description": (
                    "One input: 'image' (BYTES [N] or [N,1], encoded image files; base64 strings in JSON) or "
                    f"'{artifact.manifest.input_name}' (UINT8 [N,3,{height},{width}]). "
                    "Outputs: 'probabilities' (FP32 [N,classes]; BYTES classifications with "
                    "parameters.classification) and 'labels' (BYTES [N,k], each '<probability>:<index>:<label>', "
                    "k from parameters.top_k). With the binary tensor data extension the body is the JSON header "
                    "(its length in the Inference-Header-Content-Length header) followed by the binary tensors. "
                    f"At most {config.max_request_images} images and {config.max_upload_bytes} bytes per request."),
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {
                    "200": {"description": "the requested outputs", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/V2InferResponse"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                    "400": v2_error("malformed request or image"),
                    "404": v2_error("unknown model or version"),
                    "413": v2_error("body over the upload limit"),
                    "415": v2_error("not an image type whatcar reads, or a compressed body"),
                    "422": v2_error("image over the pixel limit"),
                    "503": v2_error("model not ready"),
                }}},
        }

    paths = {
        "/predict": {"post": predict_operation(config, "Name the car in one photo", "predict")},
        "/upload": {"post": predict_operation(config, "Same as /predict (the original app's path)", "upload")},
        "/healthz": {"get": {"summary": "Liveness", "tags": ["health"],
                             "responses": {"200": json_response("the process answers", {"type": "object"})}}},
        "/readyz": {"get": {"summary": "Readiness", "tags": ["health"],
                            "responses": {"200": json_response("ready to score", {"type": "object"}),
                                          "503": json_response("starting or draining", {"type": "object"})}}},
        "/metadata": {"get": {"summary": "The served artifact: name, checksum, classes, preprocessing, "
                                         "the runtime running it",
                              "tags": ["model"], "responses": {"200": json_response("model metadata", {
                                  "type": "object", "properties": {"name": {"type": "string"},
                                                                   "sha256": {"type": "string"},
                                                                   "classes": {"type": "array",
                                                                               "items": {"type": "string"}},
                                                                   "num_classes": {"type": "integer"}}})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format)", "tags": ["ops"],
                             "responses": {"200": {"description": "metrics",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This description", "tags": ["ops"],
                                  "responses": {"200": json_response("OpenAPI document", {"type": "object"})}}},
        "/": {"get": static_operation("The upload page", "text/html")},
        "/static/app.js": {"get": static_operation("The upload page's script", "text/javascript")},
        "/static/app.css": {"get": static_operation("The upload page's style sheet", "text/css")},
        "/v2": {"get": {"summary": "V2 server metadata", "tags": ["v2"],
                        "responses": {"200": json_response("name, version and protocol extensions", {
                            "type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                                             "extensions": {"type": "array",
                                                                            "items": {"type": "string"}}}})}}},
        "/v2/health/live": {"get": {"summary": "V2 liveness", "tags": ["v2"],
                                    "responses": {"200": {"description": "live"}}}},
        "/v2/health/ready": {"get": {"summary": "V2 readiness", "tags": ["v2"],
                                     "responses": {"200": {"description": "ready"},
                                                   "503": {"description": "not ready"}}}},
    }
    for prefix, versioned in (("/v2/models/{name}", False), ("/v2/models/{name}/versions/{version}", True)):
        for suffix, ops in model_ops(versioned).items():
            paths[prefix + suffix] = ops
    if config.model_control == "explicit":
        paths.update(repository_paths(name_param))

    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {"type": "object"}, "data": {"type": "array"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "whatcar", "version": "1",
                 "description": f"Name the make and model of a car in a photo. Serving model '{artifact.name}' "
                                f"({len(artifact.labels)} classes, sha256 {artifact.sha256})."},
        "paths": paths,
        "components": {"schemas": {
            "Error": {"type": "object", "properties": {"title": {"type": "string"},
                                                      "description": {"type": "string"},
                                                      "code": {"type": "string"}}},
            "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Prediction": {"type": "object", "properties": {
                "predictions": {"type": "array",
                                "description": "the named model (the most likely model of the most likely make) "
                                               "first, then the others by probability",
                                "items": {"type": "object", "properties": {
                                    "label": {"type": "string"}, "probability": {"type": "number"}}}},
                "make": {"type": "object", "description": "the most likely make and its probability (the sum "
                                                          "over its models); absent for models without makes",
                         "properties": {"label": {"type": "string"}, "probability": {"type": "number"}}},
                "accepted": {"type": ["boolean", "null"],
                             "description": "whether the named model counts as an answer (null: not judged)"},
                "accepted_level": {"type": ["string", "null"], "enum": ["model", "make", None],
                                   "description": "model: the named model is the answer; make: only the make is; "
                                                  "null: turned away, or not judged"},
                "reason": {"type": "string", "description": "why it does not, when it does not"},
                "model": {"type": "object", "properties": {"name": {"type": "string"},
                                                           "sha256": {"type": "string"}}},
                "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
                "forward_pass": {"type": "object", "description": "the forward pass this photo was part of",
                                 "properties": {
                                     "ran": {"type": "string", "description": "what ran it: a compiled shape "
                                             "(b1t2: batch 1 on 2 threads; b1-64: any batch to 64) or torchscript"},
                                     "images": {"type": "integer", "description": "images in that pass, other "
                                                "requests' included"}}}}},
            "V2ModelMetadata": {"type": "object", "properties": {
                "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": tensor}, "outputs": {"type": "array", "items": tensor}}},
            "V2InferRequest": {"type": "object", "required": ["inputs"], "properties": {
                "id": {"type": "string"}, "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": tensor},
                "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string", "enum": ["probabilities", "labels", "accepted", "accepted_level",
                                                         "make", "make_probability"]},
                    "parameters": {"type": "object"}}}}}},
            "V2InferResponse": {"type": "object", "properties": {
                "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                "outputs": {"type": "array", "items": tensor}}},
        }},
    }


def repository_paths(name_param: dict) -> dict:
    """The model repository extension (serve/repository.py), served with --model-control explicit."""
    denied = {"401": v2_error("no bearer token, or not the admin token")}
    load_body = {"required": False, "content": {"application/json": {"schema": {"type": "object", "properties": {
        "parameters": {"type": "object", "properties": {
            "version": {"type": "string", "description": "a version in the model folder (default: current)"},
            "config": {"type": "string", "description": 'Triton\'s way to pick one: '
                                                        '{"version_policy": {"specific": {"versions": [N]}}}'}}}}}}}}
    return {
        "/v2/repository/index": {"post": {
            "summary": "The model versions on disk and which one is loaded", "tags": ["repository"],
            "responses": {"200": json_response("one entry per version", {"type": "array", "items": {
                "type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                                 "state": {"type": "string"}, "reason": {"type": "string"}}}}),
                          **denied}}},
        "/v2/repository/models/{name}/load": {"post": {
            "summary": "Load a version next to the serving one, check it, then switch", "tags": ["repository"],
            "parameters": [name_param], "requestBody": load_body,
            "responses": {"200": json_response("serving the version asked for", {"type": "object"}),
                          "400": v2_error("the version failed a check; the old one still serves"),
                          "404": v2_error("unknown model"), **denied}}},
        "/v2/repository/models/{name}/unload": {"post": {
            "summary": "Stop serving until the next load", "tags": ["repository"], "parameters": [name_param],
            "responses": {"200": json_response("unloaded", {"type": "object"}),
                          "404": v2_error("model not loaded"), **denied}}},
    }


class OpenApiResource:
    def __init__(self, config: Config, serving: LiveModel):
        self.config, self.serving = config, serving

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = json.dumps(build_spec(self.config, self.serving), indent=1).encode("utf-8")
        resp.content_type = falcon.MEDIA_JSON
