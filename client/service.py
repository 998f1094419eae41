"""``mirador service``: start miradord at login, as a systemd user unit (Linux) or a launchd agent (macOS).

The unit and the plist are made by pure functions (``systemd_unit``, ``launchd_plist``), so they
can be checked on any OS; ``Systemd`` and ``Launchd`` write, enable, remove and inspect them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import click

from . import daemon_control
from .errors import MiradorError
from .paths import Paths

UNIT_NAME = "miradord.service"
LAUNCHD_LABEL = "ai.mirador.miradord"
RESTART_SEC = 5
# The daemon run by the service manager must use the same directories as the `mirador` that
# installed it, or the client would not find its socket, config or memories.
PASSED_ENV = ("MIRADOR_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")


def miradord_path() -> Path:
    """This installation's ``miradord``: next to the Python running this command (a venv's bin dir)."""
    path = Path(sys.executable).parent / "miradord"  # not resolved: a venv's python is a symlink
    if not os.access(path, os.X_OK):
        raise MiradorError(f"{path} does not exist: `mirador service` needs Mirador installed with its commands "
                           f"(pip install), next to {sys.executable}")
    return path


def service_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables from ``env`` that decide where Mirador keeps things, to pass to the daemon."""
    return {name: env[name] for name in PASSED_ENV if env.get(name)}


def _quoted(text: str, command: bool = False) -> str:
    """One double-quoted systemd word: specifiers (%) and, in a command line, variables ($) escaped."""
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{text.replace("$", "$$") if command else text}"'


def systemd_unit(miradord: str, env: Mapping[str, str]) -> str:
    """The text of miradord.service, a systemd user unit."""
    return "\n".join([
        "# Written by `mirador service install`; `mirador service uninstall` removes it.",
        "[Unit]",
        "Description=Mirador personal AI daemon (miradord)",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={_quoted(miradord, command=True)}",
        *(f"Environment={_quoted(f'{name}={value}')}" for name, value in env.items()),
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "# Exit status 2 is a configuration error: starting again cannot fix it.",
        "RestartPreventExitStatus=2",
        "# SIGTERM to miradord alone: it stops its actors and its private Ray itself; whatever is",
        "# left once it has exited is killed.",
        "KillMode=mixed",
        "TimeoutStopSec=90",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def launchd_plist(miradord: str, env: Mapping[str, str], stderr_path: str) -> bytes:
    """The launchd agent ai.mirador.miradord.plist."""
    import plistlib  # only here: it pulls in an XML parser the rest of the CLI does not need

    agent: dict[str, object] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": [miradord],
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a failure, not after `mirador daemon stop`
        "ThrottleInterval": RESTART_SEC,
        "StandardErrorPath": stderr_path,
    }
    if env:
        agent["EnvironmentVariables"] = dict(env)
    return plistlib.dumps(agent)


def _run(*command: str) -> subprocess.CompletedProcess[str] | None:
    """Run a service-manager command; None when the program is not installed."""
    if shutil.which(command[0]) is None:
        return None
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _why(result: subprocess.CompletedProcess[str] | None, program: str) -> str:
    if result is None:
        return f"{program} is not installed"
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[0] if lines else f"exit status {result.returncode}"


def _note_running_daemon(paths: Paths) -> None:
    """Say so when a miradord runs already: the service's own would fail on its pid lock and retry."""
    pid = daemon_control.running_pid(paths)
    if pid is not None:
        click.echo(f"note: a miradord is running already (pid {pid}); unless the service started it, stop it with "
                   f"`mirador daemon stop`: until then the service's miradord retries every {RESTART_SEC} s")


class Systemd:
    """A systemd user unit in $XDG_CONFIG_HOME/systemd/user (default ~/.config/systemd/user)."""

    def __init__(self, env: Mapping[str, str]):
        config = env.get("XDG_CONFIG_HOME")
        base = Path(config) if config and os.path.isabs(config) else Path(env.get("HOME") or Path.home()) / ".config"
        self.path = base / "systemd" / "user" / UNIT_NAME

    def _manager_reachable(self) -> tuple[bool, str]:
        reload = _run("systemctl", "--user", "daemon-reload")
        if reload is not None and reload.returncode == 0:
            return True, ""
        return False, _why(reload, "systemctl")

    def install(self, miradord: Path, env: Mapping[str, str], paths: Paths) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(systemd_unit(str(miradord), env))
        click.echo(f"wrote {self.path}")
        reachable, why = self._manager_reachable()
        if not reachable:
            click.echo(f"not enabled: systemd's user manager cannot be reached here ({why}). The unit file stays; "
                       "in a login session with a systemd user manager run:\n"
                       f"  systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}")
            return False
        _note_running_daemon(paths)
        enable = _run("systemctl", "--user", "enable", "--now", UNIT_NAME)
        if enable is None or enable.returncode != 0:
            click.echo(f"`systemctl --user enable --now {UNIT_NAME}` failed: {_why(enable, 'systemctl')}")
            return False
        click.echo(f"enabled and started {UNIT_NAME}: it starts when you log in (at boot too after "
                   f"`loginctl enable-linger`); its output: journalctl --user -u miradord")
        return True

    def uninstall(self) -> bool:
        reachable, why = self._manager_reachable()
        if reachable and self.path.exists():
            disable = _run("systemctl", "--user", "disable", "--now", UNIT_NAME)
            click.echo(f"stopped and disabled {UNIT_NAME}" if disable is not None and disable.returncode == 0
                       else f"`systemctl --user disable --now {UNIT_NAME}` failed: {_why(disable, 'systemctl')}")
        link = self.path.parent / "default.target.wants" / UNIT_NAME
        if link.is_symlink():  # enabled while no user manager could be reached, or disable failed
            link.unlink()
            click.echo(f"removed {link}")
        if self.path.exists():
            self.path.unlink()
            click.echo(f"removed {self.path}")
        else:
            click.echo(f"{self.path} does not exist: nothing to remove")
        if reachable:
            _run("systemctl", "--user", "daemon-reload")
        else:
            click.echo(f"systemd's user manager cannot be reached here ({why}): if a miradord runs under it, "
                       "`mirador daemon stop` stops it")
        return True

    def status(self) -> None:
        click.echo(f"unit file: {self.path} ({'present' if self.path.exists() else 'absent'})")
        for query in ("is-enabled", "is-active"):
            result = _run("systemctl", "--user", query, UNIT_NAME)
            state = result.stdout.strip() if result is not None else ""
            click.echo(f"{query[3:]}: {state or 'unknown (' + _why(result, 'systemctl') + ')'}")


class Launchd:
    """A launchd agent in ~/Library/LaunchAgents."""

    def __init__(self, env: Mapping[str, str]):
        home = Path(env.get("HOME") or Path.home())
        self.path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"

    def install(self, miradord: Path, env: Mapping[str, str], paths: Paths) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # launchctl refuses to load a job that is loaded already
            _run("launchctl", "unload", str(self.path))
        paths.state.mkdir(parents=True, exist_ok=True)  # launchd opens StandardErrorPath but makes no directory
        self.path.write_bytes(launchd_plist(str(miradord), env, str(paths.state / daemon_control.STDERR_NAME)))
        click.echo(f"wrote {self.path}")
        _note_running_daemon(paths)
        load = _run("launchctl", "load", "-w", str(self.path))
        if load is None or load.returncode != 0:
            click.echo(f"not loaded: {_why(load, 'launchctl')}; the file stays, load it with:\n"
                       f"  launchctl load -w {self.path}")
            return False
        click.echo(f"loaded {LAUNCHD_LABEL}: miradord starts now and at every login")
        return True

    def uninstall(self) -> bool:
        if not self.path.exists():
            click.echo(f"{self.path} does not exist: nothing to remove")
            return True
        unload = _run("launchctl", "unload", "-w", str(self.path))
        if unload is not None and unload.returncode == 0:
            click.echo(f"unloaded {LAUNCHD_LABEL} (miradord stopped)")
        else:
            click.echo(f"`launchctl unload` failed: {_why(unload, 'launchctl')}")
        self.path.unlink()
        click.echo(f"removed {self.path}")
        return True

    def status(self) -> None:
        click.echo(f"agent file: {self.path} ({'present' if self.path.exists() else 'absent'})")
        listed = _run("launchctl", "list", LAUNCHD_LABEL)
        loaded = listed is not None and listed.returncode == 0
        pid = re.search(r'"PID" = (\d+);', listed.stdout) if listed is not None and loaded else None
        click.echo(f"loaded: {'yes' if loaded else 'no'}")
        click.echo(f"running: {f'yes (pid {pid.group(1)})' if pid else 'no'}")


def service_manager(env: Mapping[str, str]) -> Systemd | Launchd:
    if sys.platform == "darwin":
        return Launchd(env)
    if sys.platform.startswith("linux"):
        return Systemd(env)
    raise MiradorError(f"`mirador service` knows systemd (Linux) and launchd (macOS), not {sys.platform}; "
                       f"have your system start {miradord_path()} at login")


def _manager() -> Systemd | Launchd:
    try:
        return service_manager(os.environ)
    except MiradorError as exc:
        click.echo(f"mirador: {exc}", err=True)
        sys.exit(2)


@click.group()
def service() -> None:
    """Start miradord at login (systemd user unit on Linux, launchd agent on macOS)."""


@service.command("install")
def service_install() -> None:
    """Write the unit (or agent), enable it and start miradord now."""
    manager = _manager()
    try:
        miradord = miradord_path()
    except MiradorError as exc:
        click.echo(f"mirador: {exc}", err=True)
        sys.exit(1)
    sys.exit(0 if manager.install(miradord, service_env(os.environ), Paths.from_env()) else 1)


@service.command("uninstall")
def service_uninstall() -> None:
    """Stop miradord under the service manager, disable it and remove the unit (or agent)."""
    sys.exit(0 if _manager().uninstall() else 1)


@service.command("status")
def service_status() -> None:
    """Whether the unit (or agent) file exists, is enabled and is running."""
    _manager().status()
