"""The Open Inference Protocol's model repository extension, as Triton serves it, so that
`tritonclient`'s get_model_repository_index, load_model and unload_model work against whatcar:

    POST /v2/repository/index                       the versions on disk and which one is loaded
    POST /v2/repository/models/{name}/load          load the current version, or the one asked for
    POST /v2/repository/models/{name}/unload        stop serving until the next load

A load body may ask for a version as {"parameters": {"version": "3"}}, or as Triton's model
configuration does, {"parameters": {"config": "{\"version_policy\": {\"specific\": {\"versions\":
[3]}}}"}}. A version is a name looked up inside the server's own model folder, never a path;
model files sent with the request ("file:" parameters) are refused. A load blocks until the
version is serving or has failed its checks (and the old one still serves).

These routes change what the service answers, so they exist only with --model-control explicit,
and then need `Authorization: Bearer <WHATCAR_ADMIN_TOKEN>`; without a token they are served on
a loopback address only (checked at start-up, serve/config.py).
"""

from __future__ import annotations

import hmac
import json

import falcon

from .config import Config
from .errors import ArtifactError
from .live_model import LiveModel
from .manifest import Manifest
from .upload import read_body
from .v2 import V2Error, bad
from .versions import VersionError

MAX_BODY = 64 * 1024


def authorize(req: falcon.Request, token: str | None) -> None:
    if token is None:
        return  # allowed only because the server listens on loopback alone
    given = req.get_header("Authorization") or ""
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        raise V2Error(falcon.HTTP_401, "the repository API needs 'Authorization: Bearer <token>'",
                      headers={"WWW-Authenticate": 'Bearer realm="whatcar"'})
    if not hmac.compare_digest(credentials.strip().encode("utf-8"), token.encode("utf-8")):
        raise V2Error(falcon.HTTP_401, "the bearer token is not the admin token",
                      headers={"WWW-Authenticate": 'Bearer realm="whatcar", error="invalid_token"'})


def request_body(req: falcon.Request) -> dict:
    data = read_body(req, MAX_BODY) if req.content_length else b""
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("parameters", {}), dict):
        raise bad("the request body must be an object whose 'parameters' is an object")
    return body


def requested_version(parameters: dict) -> str | None:
    """The version a load body asks for, or None for the folder's current one."""
    files = [key for key in parameters if key.startswith("file:")]
    if files:
        raise bad("whatcar loads versions from its own model folder; model files in the request are not accepted")
    version = parameters.get("version")
    config = parameters.get("config")
    if config is not None:
        try:
            policy = json.loads(config).get("version_policy", {}) if isinstance(config, str) else None
            versions = policy["specific"]["versions"] if policy else None
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            versions = None
        if not (isinstance(versions, list) and len(versions) == 1):
            raise bad("a load's 'config' may only pick one version: "
                      '{"version_policy": {"specific": {"versions": [N]}}}')
        version = versions[0]
    if version is None:
        return None
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str):
        raise bad("'version' must be a version number")
    return version


class Repository:
    def __init__(self, serving: LiveModel, token: str | None):
        self.serving, self.token = serving, token

    def names(self, version: str | None) -> set[str]:
        """Names a request may use: the model serving, and the one in the version to load."""
        names = {self.serving.current.artifact.name} if self.serving.current is not None else set()
        try:
            names.add(Manifest.read(self.serving.folder.folder(version or self.serving.folder.current())).name)
        except (ArtifactError, VersionError):
            pass
        return names


class IndexResource:
    def __init__(self, repository: Repository):
        self.repository = repository

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        authorize(req, self.repository.token)
        serving = self.repository.serving
        live = serving.current
        entries = []
        for version in serving.folder.versions():
            try:
                name = Manifest.read(serving.folder.folder(version)).name
            except ArtifactError as exc:
                entries.append({"name": "", "version": version, "state": "UNAVAILABLE", "reason": str(exc)})
                continue
            loaded = live is not None and live.artifact.version == version
            entries.append({"name": name, "version": version, "state": "READY" if loaded else "UNAVAILABLE",
                            "reason": "" if loaded else "not loaded"})
        resp.media = entries


class LoadResource:
    def __init__(self, repository: Repository):
        self.repository = repository

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        authorize(req, self.repository.token)
        version = requested_version(request_body(req).get("parameters", {}))
        if name not in self.repository.names(version):
            raise V2Error(falcon.HTTP_404, f"unknown model '{name}'")
        status = self.repository.serving.reload(version)
        if status.outcome == "failed":
            raise V2Error(falcon.HTTP_400, f"failed to load '{name}' version {status.version or 'current'}: "
                                           f"{status.reason}; version {status.serving} still serves")
        resp.media = {}


class UnloadResource:
    def __init__(self, repository: Repository):
        self.repository = repository

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        authorize(req, self.repository.token)
        request_body(req)
        live = self.repository.serving.current
        if live is None or live.artifact.name != name:
            raise V2Error(falcon.HTTP_404, f"model '{name}' is not loaded")
        self.repository.serving.unload()
        resp.media = {}


def register(app: falcon.App, config: Config, serving: LiveModel) -> None:
    repository = Repository(serving, config.admin_token)
    app.add_route("/v2/repository/index", IndexResource(repository))
    app.add_route("/v2/repository/models/{name}/load", LoadResource(repository))
    app.add_route("/v2/repository/models/{name}/unload", UnloadResource(repository))
