"""Starting and stopping the daemon as a user does: autostart, `mirador daemon`, one per home."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

import pytest

from mirador.client import DaemonNotRunning, daemon_control
from mirador.runtime.ray_boot import ray_temp_dir

from .conftest import BIN


def test_autostart_then_stop_removes_socket(home):
    paths = home.paths
    refused = home.mirador("ask", "--no-autostart", "hello")
    assert refused.returncode == 1
    assert "no Mirador daemon is running" in refused.stderr and "mirador daemon start" in refused.stderr
    assert not paths.socket.exists()

    result = home.mirador("ask", "--json", "--max-tokens", "8", "Say hello.")
    assert result.returncode == 0, result.stderr
    assert "starting miradord in the background" in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "remembered" and any(e["event"] == "token" for e in events)

    # The daemon keeps running for the next question; its files follow the XDG contract.
    pid = daemon_control.running_pid(paths)
    assert pid is not None and paths.socket.exists()
    assert stat.S_IMODE(os.stat(paths.runtime).st_mode) == 0o700
    assert paths.logfile.is_file() and "ready in" in paths.logfile.read_text()

    # A second daemon for the same home refuses to start and leaves the first alone.
    second = subprocess.run([str(BIN / "miradord")], env=home.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "already running" in second.stderr
    assert daemon_control.answers(paths)

    stopped = home.mirador("daemon", "stop")
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
    assert not paths.socket.exists() and daemon_control.running_pid(paths) is None
    assert "stopped" in paths.logfile.read_text().splitlines()[-1]
    # Nothing is left running: the daemon's Ray is gone with it.
    assert subprocess.run(["pgrep", "-f", str(ray_temp_dir(paths))], capture_output=True).returncode == 1

    status = home.mirador("status")
    assert status.returncode == 1 and "not running" in status.stderr


def test_daemon_killed_mid_answer_is_reported_and_replaced(home):
    paths = home.paths
    home.env["MIRADOR_MEMORY__ENABLED"] = "false"  # also: a daemon without memory
    started = home.mirador("daemon", "start")
    assert started.returncode == 0 and "started" in started.stdout, started.stderr
    assert "already running" in home.mirador("daemon", "start").stdout
    pid = daemon_control.running_pid(paths)
    assert "memory:  off" in home.mirador("status").stdout
    off = home.mirador("memory", "list")
    assert off.returncode == 1 and "memory is off" in off.stderr
    assert not (paths.data / "memory").exists()

    with home.client(idle_timeout=60) as client:
        events = client.ask("Write a long story about a lighthouse keeper.", max_tokens=1500)
        while next(events)["event"] != "token":
            pass
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(DaemonNotRunning, match="closed the connection"):
            for _ in events:
                pass
        assert time.monotonic() - t0 < 10  # told at once, not after the idle timeout

    # Its Ray dies with it; the stale socket and pid file do not stop the next daemon.
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", str(ray_temp_dir(paths))], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "Ray processes outlived the killed daemon"
        time.sleep(0.5)
    assert paths.socket.exists() and daemon_control.running_pid(paths) is None
    result = home.mirador("ask", "--max-tokens", "4", "Hello?")
    assert result.returncode == 0 and "starting miradord" in result.stderr, result.stderr
    assert home.mirador("daemon", "stop").returncode == 0
    assert home.mirador("daemon", "stop").stdout.strip() == "miradord is not running"
