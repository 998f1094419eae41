"""Shared fixtures: isolated Mirador homes and a real daemon process per test module."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from mirador.client import Client
from mirador.client import daemon_control
from mirador.client.paths import Paths

BIN = Path(sys.executable).parent


@dataclass
class Home:
    """An isolated MIRADOR_HOME: every path a daemon or client uses lives under it."""

    root: Path
    env: dict[str, str]

    @property
    def paths(self) -> Paths:
        return Paths.from_env(self.env)

    def client(self, **kwargs) -> Client:
        return Client(self.paths.endpoint, **kwargs)

    def mirador(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
                **kwargs) -> subprocess.CompletedProcess[str]:
        """Run the real `mirador` CLI in this home (``env``: extra variables)."""
        return subprocess.run([str(BIN / "mirador"), *args], env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, **kwargs)


def make_home(config: dict[str, str] | None = None) -> Home:
    """A fresh home; ``config`` maps file names (mirador.toml, models.toml) to user overrides."""
    # Short, so the ipc socket path stays far below the unix limit whatever pytest's tmp path is.
    root = Path(tempfile.mkdtemp(prefix="mrd-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIRADOR_", "XDG_", "RAY_"))}
    # The HTTP API on a free port: test daemons (and other people's) run side by side. No
    # follow-up speculation and no answer cache: a module's questions would otherwise start
    # background generations and be answered from earlier ones' cache (test_speculation.py
    # turns both on).
    env.update(MIRADOR_HOME=str(root), PATH=f"{BIN}:{env.get('PATH', '')}", NO_COLOR="1", MIRADOR_HTTP__LISTEN="127.0.0.1:0",
               MIRADOR_JOBS__FOLLOWUPS="0", MIRADOR_CACHE__ENABLED="false")
    home = Home(root, env)
    for name, text in (config or {}).items():
        home.paths.config.mkdir(parents=True, exist_ok=True)
        (home.paths.config / name).write_text(text)
    return home


@pytest.fixture
def home():
    h = make_home()
    yield h
    daemon_control.stop(h.paths)
    shutil.rmtree(h.root, ignore_errors=True)


def done_event(events: list[dict]) -> dict:
    """The ``done`` of an ask's events (a ``remembered`` acknowledgement may follow it)."""
    (done,) = [e for e in events if e["event"] == "done"]
    return done


@dataclass
class Daemon:
    home: Home
    proc: subprocess.Popen[bytes]


def start_daemon(h: Home) -> Daemon:
    h.paths.ensure()
    log = open(h.root / "daemon.stderr", "wb")
    proc = subprocess.Popen([str(BIN / "miradord")], env=h.env, stdout=log, stderr=subprocess.STDOUT)
    daemon_control.wait_ready(h.paths, proc, timeout=180)
    return Daemon(h, proc)


def stop_daemon(d: Daemon) -> int:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
    return d.proc.wait(timeout=60)


def daemon_in_new_home(config: dict[str, str] | None = None) -> Iterator[Daemon]:
    """A real miradord in a fresh home, stopped and cleaned up afterwards (for module fixtures)."""
    h = make_home(config)
    d = start_daemon(h)
    yield d
    stop_daemon(d)
    shutil.rmtree(h.root, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon():
    """One real miradord (real Ray, llama.cpp, ZeroMQ) with the default config, shared by a test module."""
    yield from daemon_in_new_home()
