"""Start-up and shutdown: load and verify the artifact, warm up, serve with Waitress, reload the
model on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from prometheus_client import CollectorRegistry
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server

from ops import atomic

from ..http.app import create_app
from ..http.metrics import Metrics
from ..model.errors import ArtifactError
from ..model.malloc import limit_arenas
from .config import ConfigError, configure_logging, load_config, repository_exposure
from .startup import start_serving

log = logging.getLogger("whatcar")

# Multipart framing around an upload is small; this slack lets Waitress pass such bodies on to
# the app, which applies the exact limit, while Waitress itself refuses anything far larger.
# Waitress buffers a whole body before the app sees it, so only its own check avoids reading a
# huge one: it answers 413 straight from the headers (Content-Length) or as soon as a chunked body
# passes the limit, and closes the connection (lingering first, see LingeringChannel). That 413 is
# plain text, not our JSON; the status is what clients act on, and the page shows a plain message
# for any answer that is not JSON.
MULTIPART_SLACK = 64 * 1024
# How long, after an error answer that ends a connection, what the client still sends is read
# and dropped before the socket is closed.
LINGER_SECONDS = 2.0
# How often the loop wakes up by itself: the longest SIGTERM waits, and the granularity of the
# slow-request check.
TICK_SECONDS = 0.2
# While draining, how long a connection without a request is left open in case its request is
# still on the way (sent just before the signal), before it is closed as idle.
DRAIN_GRACE_SECONDS = 0.5
# systemd socket activation (sd_listen_fds(3)): the service manager passes its listening sockets
# as descriptors 3, 4, ..., says how many in LISTEN_FDS and for which process in LISTEN_PID.
LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited_socket(environ, pid: int, first_fd: int = LISTEN_FDS_START) -> socket.socket | None:
    """The listening socket a service manager handed over (systemd socket activation), or None.

    The LISTEN_* variables are meant for process LISTEN_PID only: a process that merely inherited
    them from its parent ignores them. They are removed from `environ` in every case, as
    sd_listen_fds(3) does, so that nothing started later takes them for its own. A socket that is
    not a listening TCP socket is refused, and so is more than one: the server answers on one.
    """
    raw_pid, raw_count = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    for name in LISTEN_VARIABLES:
        environ.pop(name, None)
    if raw_pid is None or raw_count is None:
        return None
    if not raw_pid.isdigit():
        raise ConfigError(f"LISTEN_PID={raw_pid!r} is not a process id")
    if int(raw_pid) != pid:
        return None
    if not raw_count.isdigit():
        raise ConfigError(f"LISTEN_FDS={raw_count!r} is not a count of descriptors")
    if int(raw_count) == 0:
        return None
    if int(raw_count) > 1:
        raise ConfigError(f"LISTEN_FDS={raw_count}: whatcar answers on one socket; "
                          "give the .socket unit a single ListenStream=")
    fd = first_fd
    try:
        os.set_inheritable(fd, False)  # close-on-exec, as sd_listen_fds sets it
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"inherited descriptor {fd} (LISTEN_FDS) is not a socket: {exc.strerror or exc}") from None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(f"inherited descriptor {fd} (LISTEN_FDS) is not a TCP socket; use ListenStream=<port>")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ConfigError(f"inherited descriptor {fd} (LISTEN_FDS) is a TCP socket that is not listening")
    return sock


def url(host: str, port) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    # torch mentions at import that numpy is absent; the server never needs it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        config = load_config(argv)
        listener = inherited_socket(os.environ, os.getpid())
        if listener is not None:
            # The address the server really answers on is the inherited socket's, not --host.
            problem = repository_exposure(config.model_control, config.admin_token, [listener.getsockname()[0]])
            if problem:
                raise ConfigError(problem)
    except ConfigError as exc:
        print(f"whatcar: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if listener is not None:
        # Connections arriving while the model loads wait in the socket's queue rather than
        # being refused: this is what makes a restart under socket activation lose none.
        log.info("serving the socket inherited from the service manager (%s); --host/--port (%s:%s) are not used",
                 url(*listener.getsockname()[:2]), config.host, config.port)
    if config.ready_file is not None:
        # Left behind by a server that was killed, it would say this one is ready while it loads.
        config.ready_file.unlink(missing_ok=True)
    if config.malloc_arenas:
        # Before any worker thread exists, so that threads starting later share the arenas.
        limit_arenas(config.malloc_arenas)
    metrics = Metrics(CollectorRegistry())
    try:
        serving = start_serving(config, metrics)
    except ArtifactError as exc:
        print(f"whatcar: cannot serve {config.model_dir}: {exc}", file=sys.stderr)
        return 1
    app = create_app(config, serving, metrics)
    where = dict(sockets=[listener]) if listener is not None else dict(host=config.host, port=config.port)
    try:
        server = create_server(
            app, **where, threads=config.threads,
            channel_timeout=config.channel_timeout,
            # Waitress looks for idle connections only every cleanup_interval (30 s by default).
            cleanup_interval=min(30, config.channel_timeout),
            max_request_body_size=config.max_upload_bytes + MULTIPART_SLACK,
            ident="whatcar", clear_untrusted_proxy_headers=True,
        )
        server.channel_class = LingeringChannel
    except OSError as exc:
        print(f"whatcar: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    stopping = threading.Event()

    def stop(signum, frame):
        log.info("received %s, draining", signal.Signals(signum).name)
        stopping.set()

    def reload(signum, frame):
        log.info("received SIGHUP, reloading the current version of %s", config.model_dir)
        serving.reload_in_background()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    host, port = server.getsockname()[:2]
    if config.pid_file is not None:
        write_pid_file(config.pid_file)
    log.info("listening on %s with %d threads%s%s", url(host, port), config.threads,
             " (inherited socket)" if listener is not None else "",
             "; model repository API on" + ("" if config.admin_token else " (loopback, no token)")
             if config.model_control == "explicit" else "")
    try:
        if config.ready_file is not None:
            # The model is loaded and warm and the socket listens, so the loop below answers /readyz
            # with 200 from its first tick: whoever waits on this file may connect at once.
            try:
                write_ready_file(config.ready_file, host, port)
            except OSError as exc:
                print(f"whatcar: cannot write the ready file {config.ready_file}: {exc.strerror or exc}",
                      file=sys.stderr)
                return 1
        serve_until(server, stopping, request_timeout=config.channel_timeout)
    finally:
        if config.ready_file is not None:
            remove_if_ours(config.ready_file, lambda text: json.loads(text)["pid"])
        serving.close()
        if config.pid_file is not None:
            remove_if_ours(config.pid_file, int)
    log.info("stopped")
    return 0


def write_pid_file(path: Path) -> None:
    """Our pid, written whole (temporary file, then rename), for `make reload` to signal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, f"{os.getpid()}\n", encoding="ascii")


def write_ready_file(path: Path, host: str, port: str) -> None:
    """Where we answer, for whoever started us (--ready-file): with --port 0 only we know the port.
    Written whole, so a reader that sees the file can read all of it."""
    ready = {"pid": os.getpid(), "host": host, "port": int(port), "url": url(host, port)}
    atomic.write_text(path, json.dumps(ready) + "\n")


def remove_if_ours(path: Path, pid_in) -> None:
    """Remove a pid or ready file if it still names this process (a newer server may have replaced
    it); `pid_in` reads the process id from the file's text."""
    try:
        if pid_in(path.read_text(encoding="utf-8")) == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass


class LingeringChannel(HTTPChannel):
    """Waitress's connection, closed gently after an error answer such as its own 413.

    Waitress answers a body over the limit from its headers and closes the connection while the
    client is still uploading. Closing a socket with unread data makes the kernel send a reset,
    which usually destroys the 413 before the client reads it: a browser or curl reports a broken
    connection instead of "too large". So after such an answer the channel only half-closes (no
    more sending), reads and drops the rest of the upload for up to LINGER_SECONDS, then closes.
    """

    error_answered = False
    lingering_until: float | None = None

    def service(self):
        if self.requests and self.requests[0].error is not None:
            self.error_answered = True
        super().service()

    def handle_close(self):
        if self.error_answered and self.lingering_until is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.lingering_until = time.monotonic() + LINGER_SECONDS
                self.will_close = False
                return
        self.close_now()

    def close_now(self):
        super().handle_close()

    def handle_read(self):
        if self.lingering_until is None:
            super().handle_read()
            return
        try:
            data = self.socket.recv(1 << 16)
        except OSError:
            data = b""
        if not data or time.monotonic() > self.lingering_until:
            self.close_now()


class SlowRequests:
    """Closes connections whose current request has been arriving for longer than `timeout` seconds.

    Waitress's channel_timeout only counts silence, so a client sending a byte a second would hold
    its connection and buffers forever. This counts from the first byte of each request instead.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.first_seen: dict = {}  # channel -> (its partial request, when first seen)

    def sweep(self, server, now: float) -> None:
        seen = {}
        for channel in list(server.active_channels.values()):
            lingering_until = getattr(channel, "lingering_until", None)
            if lingering_until is not None:
                if now > lingering_until:
                    channel.close_now()  # the client went quiet without closing
                continue
            partial = channel.request
            if partial is None or channel.requests:
                continue  # nothing arriving, or a request already being answered
            known, since = self.first_seen.get(channel, (None, now))
            since = since if known is partial else now
            if now - since > self.timeout:
                log.info("closed the connection from %s: its request took over %ss to arrive",
                         channel.addr[0] if channel.addr else "?", self.timeout)
                channel.handle_close()
            else:
                seen[channel] = (partial, since)
        self.first_seen = seen


def busy(channel) -> bool:
    """Whether a connection has a request inside: arriving, being answered, or its answer being sent."""
    return bool(channel.requests or channel.total_outbufs_len or channel.request is not None)


def serve_until(server, stopping: threading.Event, drain_seconds: float = 10.0, request_timeout: float = 30.0) -> None:
    """Run Waitress's loop until asked to stop, then drain: stop listening (new connections are
    refused; on an inherited socket they wait in its queue for the next process, since the service
    manager keeps the socket open), close idle keep-alive connections, let requests already inside
    finish and be written, and return once none is left or `drain_seconds` have passed.

    /readyz keeps answering 200 while the model is live, as it does from the first request on: with
    the socket closed no new probe gets through, and a request still queued for a worker thread
    must be answered, not refused with a 503."""
    adj = server.adj
    slow = SlowRequests(request_timeout)

    def tick(timeout: float) -> None:
        server.asyncore.loop(timeout=timeout, map=server._map, use_poll=adj.asyncore_use_poll, count=1)
        slow.sweep(server, time.monotonic())

    while not stopping.is_set():
        tick(TICK_SECONDS)
    # Connections the kernel completed before the signal belong to clients that are already
    # waiting: take them in, since closing the socket would reset them.
    for _ in range(adj.backlog):
        known = len(server._map)
        server.handle_accept()
        if len(server._map) == known:
            break
    wasyncore.dispatcher.close(server)  # stop listening, keep the trigger the workers use
    started = time.monotonic()
    while time.monotonic() - started < drain_seconds:
        tick(0.05)
        if time.monotonic() - started < DRAIN_GRACE_SECONDS:
            continue
        channels = list(server.active_channels.values())
        for channel in channels:
            if not busy(channel):
                channel.handle_close()  # idle: no task uses it, so closing here is safe
        if not any(busy(channel) for channel in channels):
            break
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
