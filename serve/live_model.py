"""The model being served, and how it is replaced while requests keep coming.

Every request scores inside `serving.lease()`, which hands it the handler that is live at that
moment and keeps that handler alive until the request is done. A reload loads the new version
beside the old one (verify, warm up, check photos: serve/handler.py's load_handler), and only
when all of that has passed makes it the live one. Requests already inside finish on the model
they started with, on the same inference threads as the new one; when its last lease ends the
old model leaves them, and its memory is handed back to the system. A reload that fails at any
step leaves the old model serving, and says why in the log, the metrics and /metadata.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from .config import Config
from .errors import ArtifactError
from .handler import Handler, load_handler
from .malloc import release_free_memory
from .manifest import Manifest
from .scheduler import PassObserver
from .versions import ModelFolder, VersionError

log = logging.getLogger("whatcar")


class NotServing(RuntimeError):
    """No model is loaded (it was unloaded through the repository API)."""


class NotThisModel(LookupError):
    """The live model is not the name or version a request asked for; the message says which is."""


@dataclass
class ReloadStatus:
    """The outcome of the last reload, as /metadata shows it."""

    outcome: str = "none"  # none | in progress | ok | unchanged | failed | unloaded
    version: str | None = None  # the version asked for
    serving: str | None = None  # the version serving afterwards
    reason: str | None = None
    at: str | None = None
    seconds: float | None = None
    count: int = 0  # reloads attempted since start-up


class _Live:
    __slots__ = ("handler", "leases", "retired")

    def __init__(self, handler: Handler):
        self.handler, self.leases, self.retired = handler, 0, False


class LiveModel:
    def __init__(self, config: Config, handler: Handler | None, observer: PassObserver | None = None,
                 on_change=None, loader=load_handler):
        self.config = config
        self.folder = ModelFolder(config.model_dir)
        self.observer = observer
        self.on_change = on_change or (lambda status, handler: None)
        self.loader = loader
        self.status = ReloadStatus(serving=handler.artifact.version if handler else None)
        self._live = _Live(handler) if handler is not None else None
        # Every version runs on the same inference threads (serve/scheduler.py says why).
        self.threads = handler.model.threads if handler is not None else None
        self._lock = threading.Lock()        # guards _live and the leases
        self._reloading = threading.Lock()   # one reload at a time
        # Every reload loads on this one thread, whoever asked (an HTTP thread, SIGHUP). What a
        # load allocates stays in its thread's malloc arena; loading on whichever HTTP thread
        # took the call left each model's freed weights in another arena (docs/benchmark.md).
        self._loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whatcar-load")

    # ------------------------------------------------------------------ requests

    @property
    def current(self) -> Handler | None:
        """The live handler, for facts about it; predictions go through lease()."""
        live = self._live
        return live.handler if live is not None else None

    @contextlib.contextmanager
    def lease(self, name: str | None = None, version: str | None = None):
        """The live handler, kept alive until the block ends. With `name` (and `version`), raises
        NotThisModel unless that is what is live: checked under the same lock that takes the
        lease, so a swap in between cannot hand over another version than the one checked."""
        with self._lock:
            live = self._live
            if live is None:
                raise NotServing("no model is loaded")
            check_identity(live.handler.artifact, name, version)
            live.leases += 1
        try:
            yield live.handler
        finally:
            with self._lock:
                live.leases -= 1
                done = live.retired and live.leases == 0
            if done:
                self._close(live)

    # ------------------------------------------------------------------ replacing the model

    def reload(self, version: str | None = None) -> ReloadStatus:
        """Load `version` (default: the folder's current one) and switch to it once it has passed
        every check. Blocks until done; returns the outcome, which is also kept in `status`."""
        with self._reloading:
            started = time.perf_counter()
            self.status = ReloadStatus(outcome="in progress", version=version, serving=self._serving_version(),
                                       count=self.status.count + 1, at=now())
            try:
                version = self.folder.check(version) if version is not None else self.folder.current()
                self.status.version = version
                folder = self.folder.folder(version)
                if self._is_live(version, folder):
                    return self._finish("unchanged", started, f"version {version} is already serving")
                handler = self._loads.submit(self.loader, folder, version, self.config, self.observer,
                                             require_checks=True, threads=self.threads).result()
                self.threads = handler.model.threads
            except Exception as exc:  # a reload never takes the server down
                if not isinstance(exc, (ArtifactError, VersionError)):
                    log.exception("unexpected error while loading version %s", version)
                log.error("reload of version %s failed, %s: %s", version or "current",
                          f"still serving version {self._serving_version()}" if self.current else "nothing is serving",
                          exc)
                return self._finish("failed", started, str(exc))
            old = self._swap(handler)
            log.info("now serving %s version %s (sha256 %s)%s", handler.artifact.name, version,
                     handler.artifact.sha256[:12],
                     f"; version {old.handler.artifact.version} retires when its last request ends" if old else "")
            return self._finish("ok", started)

    def reload_in_background(self) -> None:
        """Reload without waiting (on SIGHUP); reloads asked for meanwhile run one after another."""
        threading.Thread(target=self.reload, name="whatcar-reload", daemon=True).start()

    def unload(self) -> ReloadStatus:
        """Stop serving: requests get 503 until the next load."""
        with self._reloading:
            old = self._swap(None)
            self.status = ReloadStatus(outcome="unloaded", version=old.handler.artifact.version if old else None,
                                       count=self.status.count, at=now())
            self.on_change(self.status, None)
            return self.status

    def close(self) -> None:
        """Retire the live model (the inference threads stop once the requests inside have finished)."""
        self._swap(None)
        self._loads.shutdown(wait=False)

    # ------------------------------------------------------------------ internals

    def _is_live(self, version: str, folder) -> bool:
        """Whether `version` in `folder` is what is serving already, same model file and all."""
        live = self.current
        if live is None or live.artifact.version != version or live.artifact.folder != folder:
            return False
        try:
            return Manifest.read(folder).model_sha256 == live.artifact.sha256
        except ArtifactError:
            return False

    def _serving_version(self) -> str | None:
        handler = self.current
        return handler.artifact.version if handler is not None else None

    def _swap(self, handler: Handler | None) -> _Live | None:
        with self._lock:
            old, self._live = self._live, (_Live(handler) if handler is not None else None)
            if old is not None:
                old.retired = True
                idle = old.leases == 0
        if old is not None and idle:
            self._close(old)
        return old

    def _close(self, live: _Live) -> None:
        live.handler.close()
        # The old model's weights and activations go back to the system, not just to malloc.
        release_free_memory()

    def _finish(self, outcome: str, started: float, reason: str | None = None) -> ReloadStatus:
        self.status.outcome, self.status.reason = outcome, reason
        self.status.serving = self._serving_version()
        self.status.seconds = round(time.perf_counter() - started, 3)
        self.on_change(self.status, self.current)
        return self.status

    def describe(self) -> dict:
        return asdict(self.status)


def check_identity(artifact, name: str | None, version: str | None) -> None:
    """Raise NotThisModel unless `artifact` is model `name` (when given) at `version` (when given)."""
    if name is not None and name != artifact.name:
        raise NotThisModel(f"unknown model '{name}'; this server serves '{artifact.name}'")
    if version is not None and version != artifact.version:
        raise NotThisModel(f"model '{name}' has no version '{version}' loaded; it serves version "
                           f"'{artifact.version}'")


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
