"""Finding, starting and stopping the daemon from the client side (no Ray imported here)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from typing import Callable

from .api import Client, DaemonNotRunning, MiradorError
from .paths import Paths

STDERR_NAME = "miradord.stderr"
START_TIMEOUT_S = 180.0  # a first start on a slow machine: Ray (~5 s) plus the model load


def running_pid(paths: Paths) -> int | None:
    """The pid of the daemon holding the pid-file lock, or None when no daemon is alive."""
    for _ in range(50):
        try:
            handle = open(paths.pidfile)
        except FileNotFoundError:
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # nobody holds it: the file is stale
            except BlockingIOError:
                text = handle.read().strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)  # the daemon has the lock but has not written its pid yet
    return None


def answers(paths: Paths, timeout: float = 1.0) -> bool:
    """Whether a ready daemon answers ping on its socket."""
    if not paths.socket.exists():
        return False
    with Client(paths.endpoint) as client:
        try:
            return bool(client.ping(timeout=timeout).get("ready"))
        except DaemonNotRunning:
            return False


def spawn(paths: Paths, args: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``miradord`` detached from this terminal; its early output goes to a file."""
    paths.ensure()
    with open(paths.state / STDERR_NAME, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "mirador.runtime.daemon", *(args or [])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C in the terminal must not reach the daemon
        )


def _tail(paths: Paths, lines: int = 15) -> str:
    for path in (paths.state / STDERR_NAME, paths.logfile):
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            continue
        if text:
            return "\n".join(text[-lines:])
    return "(no output)"


def wait_ready(paths: Paths, proc: subprocess.Popen[bytes] | None, progress: Callable[[float], None] | None = None,
               timeout: float = START_TIMEOUT_S) -> None:
    """Block until the daemon answers, or raise MiradorError with what its log says."""
    started = time.monotonic()
    while (waited := time.monotonic() - started) < timeout:
        if answers(paths, timeout=0.5):
            return
        if proc is not None and proc.poll() is not None:
            raise MiradorError(f"miradord exited with status {proc.returncode} while starting:\n{_tail(paths)}")
        if proc is None and running_pid(paths) is None:
            raise MiradorError(f"miradord stopped while starting:\n{_tail(paths)}")
        if progress:
            progress(waited)
        time.sleep(0.2)
    raise MiradorError(f"miradord did not become ready within {timeout:.0f} s; its log is {paths.logfile}")


def ensure_running(paths: Paths, progress: Callable[[float], None] | None = None,
                   args: list[str] | None = None) -> bool:
    """Make sure a ready daemon is there; returns True if this call started it."""
    if answers(paths):
        return False
    if running_pid(paths) is not None:  # one is starting (or another client just started it)
        wait_ready(paths, None, progress)
        return False
    wait_ready(paths, spawn(paths, args), progress)
    return True


def stop(paths: Paths, timeout: float = 60.0) -> int | None:
    """SIGTERM the daemon and wait until it has let go of its lock. Returns its pid, or None."""
    pid = running_pid(paths)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(paths) is not None:
        if time.monotonic() > deadline:
            raise MiradorError(f"miradord (pid {pid}) did not stop within {timeout:.0f} s; see {paths.logfile}")
        time.sleep(0.1)
    return pid
