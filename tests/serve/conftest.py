import falcon.testing
import pytest

from serve.http.app import create_app
from serve.model.handler import build_handler
from serve.model.live_version import LiveVersion
from serve.model.onednn import cap_isa
from serve.process.config import Config
from tests.support.paths import ARTIFACTS, car_photos

# Compiled packages run here as the server runs them: oneDNN capped at the ISA their weights are
# packed for (serve/model/onednn.py), set before any test runs a convolution.
cap_isa()


@pytest.fixture(scope="session")
def config() -> Config:
    return Config(model_dir=ARTIFACTS, inference_workers=2, max_upload_bytes=2 * 1024 * 1024,
                  max_image_pixels=4_000_000)


@pytest.fixture(scope="session")
def handler(config):
    return build_handler(config.inference)


@pytest.fixture()
def serving(config, handler) -> LiveVersion:
    """The session's handler as the live model (never closed by a test)."""
    return LiveVersion(config.inference, handler)


@pytest.fixture()
def client(config, serving) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(config, serving))


@pytest.fixture()
def unloaded(config) -> falcon.testing.TestClient:
    """The app with no model live, as after an unload through the repository API."""
    return falcon.testing.TestClient(create_app(config, LiveVersion(config.inference, None)))


@pytest.fixture(scope="session")
def photo() -> bytes:
    return car_photos()[0].read_bytes()

