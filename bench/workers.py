"""The benchmark's measuring processes: each loads once, then answers one JSON line per JSON
command on its stdin (bench/floor.py in the serve virtualenv, bench/fastai_baseline.py in the
training one), so that `python -m bench` can measure them in alternation with the servers."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """A measuring process that loads once, then answers one JSON line per JSON command."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, timeout: float):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, start_new_session=True)
        self.hello = self._read(timeout)

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-2:]
            raise RuntimeError(f"{self.name} gave no answer ({'exited' if ready else 'timed out'}): "
                               + " | ".join(tail))
        return json.loads(line)

    def ask(self, command: dict, timeout: float = 600) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.log.close()


def start_worker(name: str, cmd: list[str], log_path: Path, timeout: float) -> Worker | str:
    """A Worker, or the reason it is unavailable (its first line may say it skipped)."""
    try:
        worker = Worker(name, cmd, log_path, timeout)
    except (OSError, RuntimeError) as exc:
        return str(exc)
    if "skipped" in worker.hello:
        worker.close()
        return worker.hello["skipped"]
    return worker


