import io

import falcon.testing
import pytest

from serve.app import State, create_app
from serve.config import Config
from serve.handler import build_handler
from serve.live_model import LiveModel
from tests.conftest import ARTIFACTS, car_photos


@pytest.fixture(scope="session")
def config() -> Config:
    return Config(model_dir=ARTIFACTS, inference_workers=2, max_upload_bytes=2 * 1024 * 1024,
                  max_image_pixels=4_000_000)


@pytest.fixture(scope="session")
def handler(config):
    return build_handler(config)


@pytest.fixture()
def state() -> State:
    return State(ready=True)


@pytest.fixture()
def serving(config, handler) -> LiveModel:
    """The session's handler as the live model (never closed by a test)."""
    return LiveModel(config, handler)


@pytest.fixture()
def client(config, serving, state) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(config, serving, state))


@pytest.fixture(scope="session")
def photo() -> bytes:
    return car_photos()[0].read_bytes()


def encode(image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def multipart(fields: list[tuple[str, str, bytes, str]], boundary: str = "whatcarboundary") -> tuple[bytes, str]:
    """A multipart/form-data body from (name, filename, data, content type) parts."""
    out = io.BytesIO()
    for name, filename, data, content_type in fields:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
