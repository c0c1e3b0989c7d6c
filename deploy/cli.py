"""python3 -m deploy {release,rollback,status} --prefix DIR"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .release import Options, deploy, rollback, status

MIN_PYTHON = (3, 9)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m deploy",
        description="Side-by-side whatcar releases under PREFIX: build and check one, switch PREFIX/current to it "
                    "atomically, roll back to the previous one.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{release,rollback,status}")

    release = commands.add_parser(
        "release", help="build, check and switch to a release of the repository's current commit",
        description="Build PREFIX/releases/<id> from the commit checked out in --source (never uncommitted "
                    "edits), with its own serve virtualenv; start its server on a spare loopback port and check "
                    "that it becomes ready and scores its model's check photos; then point PREFIX/current at it.")
    release.add_argument("--prefix", type=Path, required=True, help="deploy folder, e.g. /opt/whatcar")
    release.add_argument("--source", type=Path, default=Path("."), help="the whatcar git repository [.]")
    release.add_argument("--pip-args", default="",
                         help="extra pip install arguments, given with '=': --pip-args='--extra-index-url URL'")
    release.add_argument("--keep", type=int, default=3,
                         help="releases kept (at least 2); the current and previous ones are never removed [3]")
    release.add_argument("--env-file", type=Path, default=None,
                         help="the service's EnvironmentFile: the check runs the server with its settings")
    release.add_argument("--ready-timeout", type=float, default=120.0,
                         help="seconds the release's server may take to become ready [120]")
    release.add_argument("--fresh-venv", action="store_true",
                         help="install the virtualenv with pip even when an earlier release's could be shared")

    for name, text in (("rollback", "point PREFIX/current back at the release that was current before it"),
                       ("status", "list the releases, the current one and the one a rollback returns to")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--prefix", type=Path, required=True, help="deploy folder, e.g. /opt/whatcar")
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.version_info < MIN_PYTHON:
        print(f"deploy: needs Python {'.'.join(map(str, MIN_PYTHON))} or newer", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    # Releases are read by the service's own user: whatever the caller's umask, they must be readable.
    os.umask(0o022)
    if args.command == "rollback":
        return rollback(args.prefix)
    if args.command == "status":
        return status(args.prefix)
    if args.ready_timeout <= 0:
        print("deploy: --ready-timeout must be positive", file=sys.stderr)
        return 2
    return deploy(Options(prefix=args.prefix, source=args.source, pip_args=shlex.split(args.pip_args),
                          keep=args.keep, env_file=args.env_file, ready_timeout=args.ready_timeout,
                          fresh_venv=args.fresh_venv))
