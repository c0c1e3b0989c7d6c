"""All serving settings in one place: command-line flags, each also a WHATCAR_* variable.

A flag beats its variable, which beats the default. Everything is checked before the model
loads, so a bad setting stops the server with one clear line.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cpus import available_cpus
from .runtime.choice import RUNTIMES

MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    model_dir: Path = Path("artifacts")
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int = 4
    torch_threads: int = 1
    inference_workers: int = 1
    max_upload_bytes: int = 20 * MiB
    max_image_pixels: int = 50_000_000
    top_k: int = 5
    # The most images one /v2 inference request may carry (--max-batch): a request limit, not
    # a forward pass's size (micro_batch) nor a compiled package's batch range.
    max_request_images: int = 32
    micro_batch: int = 1
    solo_threads: int = 1
    malloc_arenas: int = 0
    batch_wait_ms: float = 0.0
    channel_timeout: int = 30
    log_level: str = "INFO"
    model_control: str = "none"
    runtime: str = "auto"
    pid_file: Path | None = None
    ready_file: Path | None = None
    # From WHATCAR_ADMIN_TOKEN only: a flag would show in the process list.
    admin_token: str | None = field(default=None, repr=False)


def _defaults() -> dict:
    cpus = available_cpus()
    # One single-threaded forward pass per CPU; a request that finds the server idle gets every
    # CPU for its one pass instead. Uploads are decoded on the inference threads, so a Waitress
    # thread mostly waits: enough of them keep the queue from running dry between passes, which
    # would hand the next lone request to a solo pass while others are a moment away.
    return dict(inference_workers=cpus, threads=max(8, 4 * cpus), solo_threads=cpus)


# (flag, field, type, help). The variable is WHATCAR_ + the flag's name in capitals, dashes as
# underscores: the flag and the variable are what users set, the field is the code's name for it.
OPTIONS = [
    ("--model-dir", "model_dir", Path, "artifact folder written by `make export`"),
    ("--host", "host", str, "address to bind; 0.0.0.0 exposes the server to the network"),
    ("--port", "port", int, "TCP port"),
    ("--threads", "threads", int, "Waitress worker threads (HTTP, decoding)"),
    ("--torch-threads", "torch_threads", int, "intra-op threads of each forward pass"),
    ("--inference-workers", "inference_workers", int, "forward passes allowed at once"),
    ("--max-upload-bytes", "max_upload_bytes", int, "largest request body accepted (413 above)"),
    ("--max-image-pixels", "max_image_pixels", int, "largest width*height decoded (422 above)"),
    ("--top-k", "top_k", int, "predictions returned when the request has no ?top_k"),
    ("--max-batch", "max_request_images", int, "most images in one /v2 inference request (400 above)"),
    ("--micro-batch", "micro_batch", int, "most waiting images an inference worker scores as one batch"),
    ("--batch-wait-ms", "batch_wait_ms", float, "how long a short batch waits for more images (0: not at all)"),
    ("--solo-threads", "solo_threads", int, "intra-op threads for a request that finds the server idle (1: none)"),
    ("--malloc-arenas", "malloc_arenas", int, "cap on glibc malloc arenas: less memory, less throughput (0: glibc's)"),
    ("--channel-timeout", "channel_timeout", int,
     "seconds a connection may idle, and a request may take to arrive whole"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR"),
    ("--model-control", "model_control", str,
     "none, or explicit: serve the model repository API (/v2/repository/...: index, load, unload); "
     "it then needs WHATCAR_ADMIN_TOKEN unless the server listens on loopback only"),
    ("--runtime", "runtime", str,
     "auto, compiled or torchscript: which of the artifact's models runs; auto takes the compiled package when "
     "this CPU and torch can run it and TorchScript otherwise, compiled refuses to start without it"),
    ("--pid-file", "pid_file", Path, "write the process id here (`make reload` signals it)"),
    ("--ready-file", "ready_file", Path,
     "once listening with the model loaded (when /readyz turns 200), write {pid, host, port, url} here as JSON; "
     "removed on a clean stop"),
]
ADMIN_TOKEN = "WHATCAR_ADMIN_TOKEN"
MODEL_CONTROL = ("none", "explicit")
LOOPBACK_NAMES = ("localhost",)


class ConfigError(ValueError):
    pass


FLAGS = {field: flag for flag, field, _, _ in OPTIONS}


def setting_name(flag: str) -> str:
    """How messages name a setting: --max-upload-bytes -> max_upload_bytes."""
    return flag.removeprefix("--").replace("-", "_")


def env_name(flag: str) -> str:
    return "WHATCAR_" + setting_name(flag).upper()


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve",
        description="Serve a whatcar artifact over HTTP: POST an image to /predict, get makes and models back.",
        epilog="Every option can also be set with the environment variable shown; a flag wins over it.",
    )
    for flag, dest, _, text in OPTIONS:
        # metavar: the usage line shows --max-batch MAX_BATCH, whatever the field is called.
        parser.add_argument(flag, dest=dest, metavar=setting_name(flag).upper(), type=str, default=None,
                            help=f"{text} [{env_name(flag)}, default: {defaults[dest]}]")
    return parser


def load_config(argv: list[str] | None = None, environ: dict | None = None) -> Config:
    """Build and validate the configuration, or raise ConfigError naming the bad setting."""
    environ = os.environ if environ is None else environ
    defaults = {**Config().__dict__, **_defaults()}
    args = build_parser(defaults).parse_args(argv)
    values = {}
    for flag, dest, kind, _ in OPTIONS:
        raw, source = getattr(args, dest), flag
        if raw is None and env_name(flag) in environ:
            raw, source = environ[env_name(flag)], env_name(flag)
        if raw is None:
            values[dest] = defaults[dest]
            continue
        try:
            values[dest] = kind(raw)
        except ValueError:
            raise ConfigError(f"{source}={raw!r} is not a valid {kind.__name__}") from None
    token = environ.get(ADMIN_TOKEN) or None
    config = Config(**values, admin_token=token)
    validate(config)
    return config


def validate(config: Config) -> None:
    positive = ("threads", "torch_threads", "inference_workers", "max_upload_bytes", "max_image_pixels", "top_k",
                "max_request_images", "micro_batch", "solo_threads", "channel_timeout")
    for name in positive:
        if getattr(config, name) < 1:
            flag = FLAGS[name]
            raise ConfigError(f"{setting_name(flag)} must be at least 1 (got {getattr(config, name)}); "
                              f"set {flag} or {env_name(flag)}")
    if config.malloc_arenas < 0:
        raise ConfigError(f"malloc_arenas must be 0 or more (got {config.malloc_arenas}); "
                          "set --malloc-arenas or WHATCAR_MALLOC_ARENAS")
    if not 0 <= config.batch_wait_ms <= 1000:
        raise ConfigError(f"batch_wait_ms must be 0-1000 (got {config.batch_wait_ms}); "
                          "set --batch-wait-ms or WHATCAR_BATCH_WAIT_MS")
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port must be 0-65535 (got {config.port})")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR (got {config.log_level!r})")
    if not config.model_dir.is_dir():
        raise ConfigError(f"model folder {config.model_dir} does not exist; set --model-dir or WHATCAR_MODEL_DIR")
    if config.model_control not in MODEL_CONTROL:
        raise ConfigError(f"model_control must be none or explicit (got {config.model_control!r}); "
                          "set --model-control or WHATCAR_MODEL_CONTROL")
    if config.runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be {', '.join(RUNTIMES)} (got {config.runtime!r}); "
                          "set --runtime or WHATCAR_RUNTIME")
    if config.ready_file is not None:
        check_ready_file(config.ready_file)
    if config.admin_token is not None and len(config.admin_token) < 16:
        raise ConfigError(f"{ADMIN_TOKEN} must be at least 16 characters (e.g. `openssl rand -hex 16`)")
    problem = repository_exposure(config.model_control, config.admin_token, [config.host])
    if problem:
        raise ConfigError(problem)


def check_ready_file(path: Path) -> None:
    """The ready file is written only after the model has loaded and warmed up: a place where it
    cannot be written is refused now, before that wait, not after it."""
    where = "set --ready-file or WHATCAR_READY_FILE"
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"ready file folder {folder} does not exist; {where}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"ready file folder {folder} is not writable; {where}")
    if path.is_dir():
        raise ConfigError(f"ready file {path} is a folder; {where}")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def repository_exposure(model_control: str, token: str | None, hosts: list[str]) -> str | None:
    """Why the model repository API may not be served on `hosts` as configured, or None. The API
    changes what the service answers: without a token it is for loopback only."""
    if model_control != "explicit" or token is not None:
        return None
    exposed = [host for host in hosts if not is_loopback(host)]
    if exposed:
        return (f"--model-control explicit on {', '.join(exposed)} needs {ADMIN_TOKEN}: without a token the "
                "repository API is allowed on a loopback address only")
    return None


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
