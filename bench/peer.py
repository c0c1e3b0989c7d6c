"""TorchServe 0.12 as the peer server: the same model.pt behind bench/ts_handler.py.

TorchServe runs from its own virtualenv (requirements/torchserve.txt; `make torchserve-env`),
since it brings Java and packages the server never needs. Anything that keeps it from starting
is reported as a reason to skip, not an error: the peer is a comparison, not a requirement.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .load import free_port

HANDLER = Path(__file__).resolve().parent / "ts_handler.py"
MODEL = "whatcar"


class Process:
    """TorchServe, started in its own process group, so stopping it takes its children along."""

    def __init__(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None, log: Path | None = None):
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_until(self, ready, timeout: float, poll: float = 0.01) -> float | None:
        """Seconds from process start until `ready()` is true; None on time-out or exit."""
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if ready():
                return time.perf_counter() - self.started
            if self.proc.poll() is not None:
                return None
            time.sleep(poll)
        return None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the whole group, then SIGKILL to whatever is left of it after `grace` seconds
        (TorchServe's Java front end outlives the launcher that started it)."""
        group = self.proc.pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.proc.poll()
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.log is not subprocess.DEVNULL:
            self.log.close()


@dataclass
class Peer:
    process: Process
    port: int
    started_seconds: float | None
    settings: dict


def write_archive(venv: Path, model_dir: Path, store: Path) -> None:
    archiver = venv / "bin" / "torch-model-archiver"
    store.mkdir(parents=True, exist_ok=True)
    extra = ",".join(str(model_dir / name) for name in ("manifest.json", "labels.txt"))
    subprocess.run([str(archiver), "--model-name", MODEL, "--version", "1.0",
                    "--serialized-file", str(model_dir / "model.pt"), "--handler", str(HANDLER),
                    "--extra-files", extra, "--export-path", str(store), "--force"],
                   check=True, capture_output=True, timeout=300)


def start(venv: Path, model_dir: Path, workdir: Path, ready, workers: int = 2, torch_threads: int = 1,
          batch_size: int = 1, max_batch_delay_ms: int = 5, timeout: float = 180.0) -> Peer | str:
    """Start TorchServe and wait until `ready(port)` is true; a string says why it could not."""
    venv, model_dir, workdir = venv.absolute(), model_dir.resolve(), workdir.resolve()
    if not (venv / "bin" / "torchserve").is_file():
        return f"no TorchServe in {venv} (make torchserve-env)"
    if shutil.which("java") is None:
        return "no java on PATH (TorchServe's front end is Java)"
    if workdir.exists():
        shutil.rmtree(workdir)
    store = workdir / "model-store"
    try:
        write_archive(venv, model_dir, store)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"torch-model-archiver failed: {exc} {detail.decode(errors='replace')[-300:]}"
    port, management, metrics = free_port(), free_port(), free_port()
    settings = {"workers": workers, "torch_threads": torch_threads, "batch_size": batch_size,
                "max_batch_delay_ms": max_batch_delay_ms}
    models = {MODEL: {"1.0": {"defaultVersion": True, "marName": f"{MODEL}.mar", "minWorkers": workers,
                              "maxWorkers": workers, "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
                              "responseTimeout": 120}}}
    config = workdir / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{port}",
        f"management_address=http://127.0.0.1:{management}",
        f"metrics_address=http://127.0.0.1:{metrics}",
        f"model_store={store}",
        f"load_models={MODEL}.mar",
        f"models={json.dumps(models)}",
        "disable_token_authorization=true",
        "enable_model_api=false",
        "install_py_dep_per_model=false",
        "disable_system_metrics=true",
    ]) + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8",
           "WHATCAR_TS_TORCH_THREADS": str(torch_threads)}
    process = Process([str(venv / "bin" / "torchserve"), "--start", "--foreground", "--ncs",
                       "--ts-config", str(config), "--model-store", str(store)],
                      env=env, cwd=workdir, log=workdir / "torchserve.log")
    started = process.wait_until(lambda: ready(port), timeout, poll=0.2)
    if started is None:
        process.stop()
        tail = (workdir / "torchserve.log").read_text(errors="replace").strip().splitlines()[-3:]
        return "TorchServe did not become ready: " + " | ".join(tail)
    return Peer(process, port, started, settings)
