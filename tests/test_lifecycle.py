"""Starting and stopping the daemon as a user does: autostart, `mirador daemon`, one per home."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from mirador.client import daemon_control
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
    assert events[-1]["event"] == "done" and any(e["event"] == "token" for e in events)

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


def test_daemon_start_command_and_stale_socket(home):
    paths = home.paths
    paths.ensure()
    paths.socket.write_text("left by a daemon that was killed")  # a stale socket file
    started = home.mirador("daemon", "start")
    assert started.returncode == 0, started.stderr
    assert "started" in started.stdout
    again = home.mirador("daemon", "start")
    assert "already running" in again.stdout
    assert home.mirador("daemon", "stop").returncode == 0
    assert home.mirador("daemon", "stop").stdout.strip() == "miradord is not running"
