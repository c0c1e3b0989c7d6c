"""Start-up and shutdown: load and verify the artifact, warm up, serve with Waitress."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import warnings

import torch
from waitress import wasyncore
from waitress.server import create_server

from .app import State, create_app
from .artifact import Artifact, ArtifactError, load_artifact
from .config import Config, ConfigError, load_config
from .inference import Model
from .scoring import Scorer

log = logging.getLogger("whatcar")

# Multipart framing around an upload is small; this slack lets Waitress pass such bodies on to
# the app, which applies the exact limit, while Waitress itself refuses anything far larger.
MULTIPART_SLACK = 64 * 1024


def build_scorer(config: Config) -> Scorer:
    """Verify, load and warm the model; raises ArtifactError with a one-line reason."""
    torch.set_num_threads(config.torch_threads)
    artifact: Artifact = load_artifact(config.model_dir)
    model = Model(artifact.module, workers=config.inference_workers)
    started = time.perf_counter()
    model.warm_up(*artifact.input_size)
    log.info("loaded %s (%d classes, sha256 %s) in %.2fs, warmed up in %.2fs; torch threads %d, "
             "inference workers %d", artifact.name, len(artifact.labels), artifact.sha256[:12],
             artifact.load_seconds, time.perf_counter() - started, config.torch_threads, config.inference_workers)
    return Scorer(artifact, model, config.max_image_pixels)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    # torch mentions at import that numpy is absent; the server never needs it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"whatcar: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        scorer = build_scorer(config)
    except ArtifactError as exc:
        print(f"whatcar: cannot serve {config.model_dir}: {exc}", file=sys.stderr)
        return 1
    state = State(ready=True)
    app = create_app(config, scorer, state)
    try:
        server = create_server(
            app, host=config.host, port=config.port, threads=config.threads,
            channel_timeout=config.channel_timeout,
            max_request_body_size=config.max_upload_bytes + MULTIPART_SLACK,
            ident="whatcar", clear_untrusted_proxy_headers=True,
        )
    except OSError as exc:
        print(f"whatcar: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    stopping = threading.Event()

    def stop(signum, frame):
        log.info("received %s, draining", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.getsockname()[:2]
    log.info("listening on http://%s:%s with %d threads", host, port, config.threads)
    serve_until(server, stopping, state)
    log.info("stopped")
    return 0


def serve_until(server, stopping: threading.Event, state: State, drain_seconds: float = 10.0) -> None:
    """Run Waitress's loop until asked to stop, then drain: refuse new connections and work,
    let requests already inside finish and be written, and return."""
    adj = server.adj
    while not stopping.is_set():
        server.asyncore.loop(timeout=adj.asyncore_loop_timeout, map=server._map, use_poll=adj.asyncore_use_poll,
                             count=1)
    state.set_ready(False)
    wasyncore.dispatcher.close(server)  # stop listening, keep the trigger the workers use
    deadline = time.monotonic() + drain_seconds
    while time.monotonic() < deadline and any(
            channel.requests or channel.total_outbufs_len for channel in list(server.active_channels.values())):
        server.asyncore.loop(timeout=0.05, map=server._map, use_poll=adj.asyncore_use_poll, count=1)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
