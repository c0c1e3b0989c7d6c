"""A real `python -m serve` on a free loopback port, for clients that talk to it from outside.

These tests run from the test-only client virtualenv (tritonclient, Playwright, numpy); the
server runs from the serve virtualenv, exactly as deployed, so nothing of the client side can
leak into it.
"""

import pytest

from tests.support.paths import ARTIFACTS, SERVE_PYTHON
from tests.support.server import Client, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Client:
    assert SERVE_PYTHON.exists(), f"{SERVE_PYTHON} missing; run through `make test-client`, which builds it"
    log = tmp_path_factory.mktemp("server") / "server.log"
    with start_server(ARTIFACTS, log, "--threads", "4", "--inference-workers", "1", "--torch-threads", "1",
                      python=SERVE_PYTHON) as srv:
        yield Client.of(srv)


@pytest.fixture(scope="session")
def metadata(server) -> dict:
    return server.get_json("/metadata")
