"""A throwaway Ray cluster on this machine: a head node and worker nodes, each a `ray start --block`
child of the test, stopped by pid.

Never `ray stop`: it signals every Ray process on the machine by name, so it would also stop any
other cluster running here. A blocking `ray start` stays the parent of its GCS and raylet, which
Ray ties to it (they die with it), and it is started in a session of its own; Ray's worker
processes get process groups of their own but stay in that session, so what is left of a node
after its `ray start` ended is found by session id and killed by pid.

127.0.0.2 rather than 127.0.0.1: Ray replaces 127.0.0.1 with the host's network address, and
127.0.0.2 keeps the traffic on the loopback interface. The temporary folder is short because Ray's
Unix socket paths inside it must stay under 108 bytes.

Each node's object store (shared memory) holds the whole model version a job ships, about 29 MB
for the default model, with room to spare: an object that does not fit is written to disk
instead, and Ray refuses that on a disk more than 95 % full, failing the job for a reason that is
not the job's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODE_IP = "127.0.0.2"
READY = "Ray runtime started"


def free_port(host: str = NODE_IP) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def in_session(session: int) -> list[int]:
    """The pids of every process in a session, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session:
                pids.append(int(entry))
    return pids


class LocalCluster:
    def __init__(self, ray: Path, workers: int = 1, start_timeout: float = 90.0,
                 object_store_bytes: int = 256 * 2**20, env: dict[str, str] | None = None):
        self.ray, self.workers, self.start_timeout = ray, workers, start_timeout
        self.object_store_bytes, self.env = object_store_bytes, env or {}
        self.nodes: list[subprocess.Popen] = []
        self.sessions: list[int] = []
        self.root = Path(tempfile.mkdtemp(prefix="wcray-", dir="/tmp"))
        self.address = f"{NODE_IP}:{free_port()}"

    def start(self) -> LocalCluster:
        try:
            self._node("head", "--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=false")
            for i in range(self.workers):
                self._node(f"worker{i}", f"--address={self.address}")
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, name: str, *args: str) -> None:
        log = self.root / f"{name}.log"
        (self.root / name).mkdir()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
            "RAY_USAGE_STATS_ENABLED": "0",
            # The autoscaler's metrics port is fixed (44217) unless set: two heads would clash.
            "AUTOSCALER_METRIC_PORT": str(free_port("0.0.0.0")),
            # A stopping node waits up to 30 s for its workers to drain; a test cluster need not.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        } | self.env
        with open(log, "wb") as out:
            # cwd outside the repository: workers must get whatcar's code from the job itself.
            node = subprocess.Popen([str(self.ray), "start", "--block", "--disable-usage-stats",
                                     f"--temp-dir={self.root / name}", f"--node-ip-address={NODE_IP}",
                                     "--num-cpus=1", f"--object-store-memory={self.object_store_bytes}", *args],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=self.root, start_new_session=True)
        self.nodes.append(node)
        self.sessions.append(node.pid)
        deadline = time.monotonic() + self.start_timeout
        while READY not in log.read_text(errors="replace"):
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray {name} node did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every node started here, workers first, and anything left in their sessions."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(20)
                except subprocess.TimeoutExpired:
                    pass
        deadline = time.monotonic() + 10
        while any(in_session(s) for s in self.sessions) and time.monotonic() < deadline:
            for session in self.sessions:
                for pid in in_session(session):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.2)
        for node in self.nodes:
            if node.poll() is None:
                node.wait(10)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[int]:
        return [pid for session in self.sessions for pid in in_session(session)]
