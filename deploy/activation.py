"""Start a program the way systemd socket activation does: an already-listening socket as
descriptor 3, LISTEN_FDS=1 and LISTEN_PID set to the program's own process id.

LISTEN_PID can only be known after the fork, so a few lines of Python run in between: they move
the socket to descriptor 3, set the variables and exec the program in the same process. They also
ask the kernel to kill the program if the process that started it dies, so that a deploy killed
midway leaves no release server running behind it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

SD_LISTEN_FDS_START = 3

_EXEC_WITH_SOCKET = """
import ctypes, os, signal, sys
fd, parent = int(sys.argv[1]), int(sys.argv[2])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(1)  # the parent died before the death signal was armed
if fd != 3:
    os.dup2(fd, 3)  # the copy is inheritable
    os.close(fd)
else:
    os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ.pop("LISTEN_FDNAMES", None)
os.execv(sys.argv[3], sys.argv[3:])
"""


def listening_socket(host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def spawn_with_socket(argv: list[str], sock: socket.socket, **popen) -> subprocess.Popen:
    """Popen(argv) with `sock` handed over through LISTEN_FDS/LISTEN_PID. argv[0] must be a path.

    The caller keeps its own copy of the socket: connections that arrive while the program starts,
    or between one program stopping and the next starting on the same socket, wait in its queue."""
    fd = sock.fileno()
    env = dict(popen.pop("env", None) or os.environ)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-I", "-c", _EXEC_WITH_SOCKET, str(fd), str(os.getpid()), *argv],
                            pass_fds=(fd,), env=env, **popen)
