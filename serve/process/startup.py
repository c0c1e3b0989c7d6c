"""Start-up shared by `python -m serve` (server.py) and any other WSGI server (get_app): the
current version loaded, warmed up and checked, as the live version the app serves."""

from __future__ import annotations

import falcon
from prometheus_client import CollectorRegistry

from ..http.app import create_app
from ..http.metrics import Metrics
from ..model.handler import build_handler
from ..model.live_version import LiveVersion
from .config import Config, configure_logging, load_config


def start_serving(config: Config, metrics: Metrics) -> LiveVersion:
    """Load the current version for `config`, reporting passes and model changes to `metrics`;
    raises ArtifactError with a one-line reason."""
    handler = build_handler(config.inference, observer=metrics.observe_pass)
    return LiveVersion(config.inference, handler, observer=metrics.observe_pass, on_change=metrics.model_changed)


def get_app(environ: dict | None = None) -> falcon.App:
    """The app for any WSGI server, configured from WHATCAR_* variables alone, e.g.
    `gunicorn 'serve.process.startup:get_app()'`. The model is loaded and warmed up before it returns.

    Only `python -m serve` adds what Waitress is set up for there: the request body cut-off
    before reading, slow-client timeouts, the SIGTERM drain and reloads on SIGHUP (see
    server.py)."""
    # Flags are not read: under another server, sys.argv holds that server's own arguments.
    config = load_config([], environ)
    configure_logging(config.log_level)
    metrics = Metrics(CollectorRegistry())
    return create_app(config, start_serving(config, metrics), metrics)
