"""Deploy, roll back and list releases under a prefix, one named step at a time.

A deploy builds the new release beside the others under a temporary name, checks it with its own
server, and only then renames it into place and switches `current`. Until that switch nothing the
service uses is touched, so a failure, a full disk or a kill at any step leaves it serving what it
served; the next deploy clears what the failed one left.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from . import build
from .check import CheckFailed, check_release, photo_checks
from .envfile import EnvFileError, read_env_file
from .errors import StepFailed, describe_os_error
from .layout import BUILD_PREFIX, RELEASE_FILE, Prefix
from .policy import new_release_id, previous_release, releases_to_remove, rollback_stack, venv_key

LOGS_KEPT = 20
RESTART_HINT = "restart the service to run it: systemctl restart whatcar.service"
# For tests on machines that cannot mount a small filesystem or revoke root's write access:
# "prefix:EROFS" or "venv:ENOSPC" makes that step fail as if the system had raised that error.
INJECT_VARIABLE = "WHATCAR_DEPLOY_INJECT"


@dataclass
class Options:
    prefix: Path
    source: Path = Path(".")
    pip_args: list[str] = field(default_factory=list)
    keep: int = 3
    env_file: Path | None = None
    ready_timeout: float = 120.0
    fresh_venv: bool = False


class Interrupted(Exception):
    pass


class Run:
    """One deploy or rollback: its output lines (to stdout and to its log) and the step it is in."""

    def __init__(self, verb: str):
        self.verb = verb
        self.step = "start"
        self.log = None
        self.pending: list[str] = []

    def say(self, text: str) -> None:
        line = f"{self.verb}: {self.step}: {text}" if self.step else f"{self.verb}: {text}"
        print(line, flush=True)
        if self.log is None:
            self.pending.append(line)
        else:
            self.log.write(f"{line}\n".encode())
            self.log.flush()

    def open_log(self, path: Path) -> None:
        self.log = open(path, "ab")
        for line in self.pending:
            self.log.write(f"{line}\n".encode())
        self.log.flush()

    @contextmanager
    def stage(self, name: str, text: str | None = None):
        self.step = name
        if text:
            self.say(text)
        try:
            yield
        except OSError as exc:
            raise StepFailed(name, describe_os_error(exc)) from None


def inject(step: str) -> None:
    wanted = os.environ.get(INJECT_VARIABLE, "")
    name, _, code = wanted.partition(":")
    if name == step and hasattr(errno, code):
        number = getattr(errno, code)
        raise OSError(number, os.strerror(number), f"injected by {INJECT_VARIABLE}")


@contextmanager
def interruptible():
    """SIGTERM and SIGHUP end a deploy the way Ctrl-C does, through its clean-up."""
    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def read_current(run: Run, prefix: Prefix) -> str | None:
    """The release `current` points at (None before the first deploy)."""
    with run.stage("prefix"):
        try:
            return prefix.current_release()
        except ValueError as exc:
            raise StepFailed("prefix", str(exc)) from None


def lock_prefix(run: Run, prefix: Prefix, create: bool) -> None:
    """Take the prefix for this run, creating its folders for a deploy."""
    with run.stage("prefix"):
        try:
            inject("prefix")
            if create:
                prefix.releases.mkdir(parents=True, exist_ok=True)
                prefix.logs.mkdir(exist_ok=True)
            elif not prefix.releases.is_dir():
                raise StepFailed("prefix", f"{prefix.root} holds no releases; deploy first with make deploy PREFIX=...")
            locked = prefix.lock()
        except OSError as exc:
            reason = describe_os_error(exc) if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise StepFailed("prefix", f"cannot write to {prefix.root}: {reason}") from None
        if not locked:
            raise StepFailed("prefix", f"another deploy or rollback is running in {prefix.root} "
                                       f"(it holds {prefix.lock_file})")


def tree_bytes(root: Path) -> tuple[int, int]:
    """(bytes on disk, bytes in files no other release shares), each file counted once."""
    seen: set[tuple[int, int]] = set()
    total = own = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size = st.st_blocks * 512
            total += size
            if st.st_nlink == 1 or name in dirnames:
                own += size
    return total, own


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def check_env(env_file: Path | None) -> dict[str, str]:
    """The environment the release's server is checked in: this one without whatcar's settings or a
    Python search path, plus the service's EnvironmentFile when given."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHATCAR_") and k not in dropped}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # as in the unit: the release folder is read-only to the service
    if env_file is not None:
        env.update(read_env_file(env_file))
    return env


def sharable_venv(prefix: Prefix, complete: list[str], key: str) -> str | None:
    """The newest release whose virtualenv was built from the same recipe, if any."""
    for name in reversed(complete):
        if (prefix.release_info(name).get("venv", {}).get("key") == key
                and (prefix.release_dir(name) / build.VENV / "bin" / "python").exists()):
            return name
    return None


def deploy(opts: Options) -> int:
    run = Run("deploy")
    started = time.monotonic()
    prefix = Prefix(opts.prefix)
    current = None
    building: Path | None = None
    alias: Path | None = None
    finished = switched = False
    log_path: Path | None = None
    try:
        with interruptible():
            if opts.keep < 2:
                raise StepFailed("options", "keep must be at least 2 (the current release and the previous one)")
            try:
                env = check_env(opts.env_file)
            except EnvFileError as exc:
                raise StepFailed("options", str(exc)) from None

            current = read_current(run, prefix)
            lock_prefix(run, prefix, create=True)

            with run.stage("tidy"):
                leftovers = prefix.leftovers()
                for path in leftovers:
                    prefix.remove(path)
                if leftovers:
                    run.say(f"removed {len(leftovers)} leftovers of an interrupted deploy: "
                            + ", ".join(p.name for p in leftovers))

            with run.stage("code"):
                commit, subject, changed = build.commit_of(opts.source)
                complete = prefix.complete_releases()
                release_id = new_release_id(datetime.now(UTC), commit, set(complete))
                log_path = prefix.logs / f"{release_id}.log"
                run.open_log(log_path)
                run.say(f"{commit[:12]} {subject!r} from {opts.source.absolute()} -> release {release_id}")
                if changed:
                    run.say(f"note: {len(changed)} files with uncommitted changes are not part of the release "
                            f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})")
                building = prefix.releases / f"{BUILD_PREFIX}{release_id}"
                building.mkdir()
                # Everything is built through the release's final path, which meanwhile names the
                # temporary folder: the paths pip writes into scripts are then already the right ones.
                alias = prefix.release_dir(release_id)
                os.symlink(building.name, alias)
                build.export_code(opts.source, commit, alias)
                root = alias

            with run.stage("model"):
                # Before anything is built: a model that cannot be checked stops the deploy in a second.
                model_dir = Path(env.get("WHATCAR_MODEL_DIR", "artifacts"))
                model_dir = model_dir if model_dir.is_absolute() else root / model_dir
                try:
                    checks = photo_checks(model_dir)
                except CheckFailed as exc:
                    raise StepFailed("model", str(exc).replace(f"{root}/", "")) from None
                run.say(f"{model_dir.name}/ with {len(checks)} check photo{'s' if len(checks) > 1 else ''}: "
                        + ", ".join(f"{c.path.name} -> {c.top1}" for c in checks))

            with run.stage("venv"):
                inject("venv")
                python = sys.executable
                key = venv_key(python, platform.python_version(), (root / build.REQUIREMENTS).read_bytes(),
                               opts.pip_args)
                donor = None if opts.fresh_venv else sharable_venv(prefix, complete, key)
                if donor:
                    run.say(f"same requirements, Python and pip arguments as {donor}: sharing its virtualenv's "
                            "files (hard links)")
                    run.say(f"{build.link_venv(prefix.release_dir(donor) / build.VENV, root)} files linked")
                else:
                    run.say(f"building {build.VENV} with {python} (Python {platform.python_version()}) from "
                            f"{build.REQUIREMENTS}{' ' + ' '.join(opts.pip_args) if opts.pip_args else ''}")
                    if python.startswith(("/root/", "/home/")):
                        run.say(f"note: the service cannot run {python}: its home folder is hidden from it "
                                "(ProtectHome=); deploy with a system Python, PYTHON=/usr/bin/python3")
                    build.build_venv(root, building / ".pip", python, opts.pip_args, run.log)

            with run.stage("compile", "bytecode for the release's code"):
                build.compile_code(root, run.log)

            with run.stage("check", "starting the release's own server on a spare loopback port"):
                server_log = building / ".check.log"
                try:
                    results = check_release(root, root / build.VENV / "bin" / "python", env, model_dir,
                                            opts.ready_timeout, server_log)
                except CheckFailed as exc:
                    raise StepFailed("check", str(exc)) from None
                finally:
                    if server_log.exists():
                        run.log.write(b"--- the release's server said:\n" + server_log.read_bytes() + b"---\n")
                        server_log.unlink()
                for line in results:
                    run.say(line)

            with run.stage("finish"):
                total, own = tree_bytes(building)
                info = {
                    "id": release_id, "commit": commit, "subject": subject, "source": str(opts.source.absolute()),
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "python": {"executable": python, "version": platform.python_version()},
                    "venv": {"key": key, "pip_args": opts.pip_args, "linked_from": donor},
                    "check": {"model_dir": str(model_dir), "results": results},
                    "bytes": total, "own_bytes": own,
                    "build_seconds": round(time.monotonic() - started, 1),
                }
                (building / RELEASE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
                alias.unlink()
                prefix.add(building, release_id)
                finished = True
                run.say(f"release {release_id} complete: {mb(total)} on disk, {mb(own)} of it its own")

            with run.stage("switch"):
                stack = rollback_stack(prefix.read_history(), current, set(complete))
                prefix.switch(release_id)
                switched, previous, current = True, current, release_id
                stack.append(release_id)
                prefix.write_history(stack)
                run.say(f"current -> releases/{release_id} (was {previous or 'nothing'})")

        # The release is current from here on: what follows only tidies.
        run.step = "prune"
        try:
            for name in releases_to_remove(prefix.complete_releases(), stack, opts.keep):
                prefix.remove(prefix.release_dir(name))
                run.say(f"removed release {name} (keeping {opts.keep})")
            for old in sorted(prefix.logs.glob("*.log"))[:-LOGS_KEPT]:
                old.unlink()
        except OSError as exc:
            run.say(f"warning: {describe_os_error(exc)}; the new release is current all the same")
        run.step = ""
        run.say(f"done in {time.monotonic() - started:.0f} s: current is {release_id}; {RESTART_HINT}")
        return 0
    except (StepFailed, Interrupted, KeyboardInterrupt) as exc:
        step, reason = failure(run, exc)
        still = (f"current is {current}" if switched else f"current is still {current}" if current
                 else "nothing is current yet")
        where = f" (log: {log_path})" if log_path else ""
        run.step = ""
        run.say(f"FAILED at step {step!r}: {reason}; {still}{where}")
        return 1
    finally:
        if not finished:
            for path in (alias, building):
                if path is not None and (path.is_symlink() or path.exists()):
                    try:
                        prefix.remove(path)
                    except OSError:
                        pass  # the next deploy's tidy step removes it
        if run.log is not None:
            run.log.close()


def failure(run: Run, exc: BaseException) -> tuple[str, str]:
    """(step, reason) for the one-line report of a failed or interrupted run."""
    if isinstance(exc, StepFailed):
        return exc.step, exc.reason
    return run.step, f"interrupted ({exc or 'SIGINT'})"


def rollback(root: Path) -> int:
    run = Run("rollback")
    prefix = Prefix(root)
    current = None
    try:
        with interruptible():
            current = read_current(run, prefix)
            lock_prefix(run, prefix, create=False)
            with run.stage("rollback"):
                if current is None:
                    raise StepFailed("rollback", f"nothing is deployed in {prefix.root}")
                stack = rollback_stack(prefix.read_history(), current, set(prefix.complete_releases()))
                target = previous_release(stack)
                if target is None:
                    raise StepFailed("rollback", f"there is no release before {current} to return to")
                python = prefix.release_dir(target) / build.VENV / "bin" / "python"
                if not python.exists():
                    raise StepFailed("rollback", f"release {target} has no {build.VENV}; it cannot run")
                prefix.switch(target)
                prefix.write_history(stack[:-1])
        run.step = ""
        run.say(f"current is {target} (was {current}); {RESTART_HINT}")
        return 0
    except (StepFailed, Interrupted, KeyboardInterrupt) as exc:
        step, reason = failure(run, exc)
        run.step = ""
        run.say(f"FAILED at step {step!r}: {reason}; current is {'still ' + current if current else 'unset'}")
        return 1


def status(root: Path) -> int:
    prefix = Prefix(root)
    try:
        current = prefix.current_release()
    except ValueError as exc:
        print(f"status: {exc}")
        return 1
    complete = prefix.complete_releases()
    if not complete:
        print(f"status: no releases in {prefix.root}")
        return 0
    stack = rollback_stack(prefix.read_history(), current, set(complete))
    previous = previous_release(stack)
    print(f"releases in {prefix.releases}, newest first:")
    for name in reversed(complete):
        info = prefix.release_info(name)
        total, own = tree_bytes(prefix.release_dir(name))
        mark = "  <- current" if name == current else "  <- previous (make deploy-rollback)" if name == previous else ""
        print(f"  {name}  {info.get('subject', '?')!r}  {mb(total)}, {mb(own)} not shared with other releases{mark}")
    leftovers = prefix.leftovers()
    if leftovers:
        print("leftovers of an interrupted deploy (the next deploy removes them): "
              + ", ".join(p.name for p in leftovers))
    return 0
