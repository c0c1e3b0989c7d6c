"""/openapi.json and the app's real routes describe the same API, path for path, method for method."""

import falcon
import pytest
from falcon.routing import map_http_methods

# Falcon answers these on every route by itself; the description lists what the resources do.
IMPLICIT = {"OPTIONS"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def registered_routes(app: falcon.App) -> dict[str, set[str]]:
    """{uri template: methods} from the app's router, walking its tree of nodes."""
    routes, pending = {}, list(app._router._roots)
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.resource is not None:
            routes[node.uri_template] = set(map_http_methods(node.resource)) - IMPLICIT
    return routes


def documented_routes(spec: dict) -> dict[str, set[str]]:
    return {path: {m.upper() for m in item if m in HTTP_METHODS} for path, item in spec["paths"].items()}


@pytest.fixture()
def spec(client) -> dict:
    resp = client.simulate_get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    return resp.json


def test_every_route_is_documented_and_every_documented_route_exists(client, spec):
    assert spec["openapi"].startswith("3.")
    assert documented_routes(spec) == registered_routes(client.app)


def test_documented_operations_answer(client, spec, handler):
    """Each documented path and method reaches a responder: never 404 or 405."""
    values = {"name": handler.artifact.name, "version": "1"}
    for path, methods in documented_routes(spec).items():
        concrete = path.format(**values)
        for method in methods:
            resp = client.simulate_request(method, concrete)
            assert resp.status_code not in (404, 405), (method, path, resp.status_code)


def test_undocumented_methods_are_refused(client, spec, handler):
    """The converse on the real app: a method the description leaves out gets 405."""
    values = {"name": handler.artifact.name, "version": "1"}
    for path, methods in documented_routes(spec).items():
        for method in {"GET", "POST", "PUT", "DELETE"} - methods:
            assert client.simulate_request(method, path.format(**values)).status_code == 405, (method, path)


def test_references_resolve_and_path_parameters_are_declared(spec):
    schemas = spec["components"]["schemas"]

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(spec)
    for path, item in spec["paths"].items():
        fields = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == fields, (method, path)
            assert operation["responses"], (method, path)
