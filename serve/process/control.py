"""`python -m serve.process.control`: switch the running server's model from the command line.

    python -m serve.process.control reload   [--pid-file build/serve.pid] [--url http://127.0.0.1:8080]
    python -m serve.process.control rollback [--model-dir artifacts] [--pid-file ...] [--url ...]
    python -m serve.process.control status   [--model-dir artifacts] [--url ...]

reload sends the server SIGHUP (it loads the version `current` names, checks it, and switches
only if every check passes), then waits for the outcome on /metadata and prints it in one line.
rollback makes the previous version current again, then reloads. The exit status is 0 when the
server serves what was asked for, 1 otherwise. Uses the standard library only, so it answers at
once and runs from any Python.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..model.versions import VersionError, VersionFolder

PID_FILE = Path("build/serve.pid")
URL = "http://127.0.0.1:8080"
TIMEOUT = 300.0


class ControlError(Exception):
    """Why the command could not do what was asked, in one line."""


def metadata(url: str) -> dict:
    """The server's /metadata (also when it answers 503 because no model is loaded)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metadata", timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return json.loads(exc.read())
        raise ControlError(f"{url}/metadata answered {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot reach the server at {url}: {exc}") from None


def server_pid(pid_file: Path) -> int:
    try:
        pid = int(pid_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        raise ControlError(f"no server pid in {pid_file}: is `make serve` running (it writes that file)?") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ControlError(f"{pid_file} names process {pid}, which is not running") from None
    return pid


def reload(pid_file: Path, url: str, timeout: float = TIMEOUT) -> dict:
    """SIGHUP the server and wait until /metadata reports the reload it caused."""
    pid = server_pid(pid_file)
    before = metadata(url)["reload"]["count"]
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = metadata(url)["reload"]
        if status["count"] > before and status["outcome"] != "in progress":
            return status
        time.sleep(0.2)
    raise ControlError(f"the server did not report the reload within {timeout:.0f} s")


def describe(status: dict) -> str:
    if status["outcome"] == "ok":
        return f"now serving version {status['serving']} (loaded and checked in {status['seconds']:.1f} s)"
    if status["outcome"] == "unchanged":
        return f"version {status['serving']} was already serving"
    return f"reload of version {status['version'] or 'current'} failed: {status['reason']}; " \
           f"version {status['serving']} still serves"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.process.control", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("reload", "rollback", "status"))
    p.add_argument("--model-dir", type=Path, default=Path("artifacts"))
    p.add_argument("--pid-file", type=Path, default=PID_FILE)
    p.add_argument("--url", default=URL, help="the server's address (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        if args.command == "status":
            models = VersionFolder(args.model_dir)
            print(f"{args.model_dir}: versions {', '.join(models.versions()) or 'none'}; current "
                  f"{models.current()}; previous {models.previous() or 'none'}")
            try:
                served = metadata(args.url)
                print(f"server at {args.url}: serving {served.get('name', 'nothing')} version "
                      f"{served.get('version', '-')}; last reload: {served['reload']['outcome']}")
            except ControlError as exc:
                print(f"server: {exc}")
            return 0
        if args.command == "rollback":
            now, was = VersionFolder(args.model_dir).rollback()
            print(f"{args.model_dir}/current is now version {now} (was {was})")
            if not args.pid_file.is_file():
                print(f"no running server found ({args.pid_file}); the next start serves version {now}")
                return 0
        status = reload(args.pid_file, args.url)
        print(describe(status))
        return 0 if status["outcome"] in ("ok", "unchanged") else 1
    except (ControlError, VersionError) as exc:
        print(f"whatcar: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
