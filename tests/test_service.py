"""`mirador service`: the systemd user unit and the launchd agent, and installing them.

The unit is checked by systemd's own `systemd-analyze verify` when it is installed (CI installs
it). Installing runs the real `mirador` with HOME and XDG_CONFIG_HOME in a temp dir and
XDG_RUNTIME_DIR in an empty one, so a real systemctl finds no user manager (and can never touch
the user's own); the path where one answers uses a stand-in `systemctl` that records its calls.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mirador.client import service
from mirador.client.paths import Paths

from .conftest import BIN

MIRADORD = str(BIN / "miradord")


def unit_fields(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (a key such as Environment may repeat)."""
    fields: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            fields.setdefault(f"{section}.{key}", []).append(value)
    return fields


def verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "verify-run"
    runtime.mkdir(exist_ok=True)  # --user needs a runtime dir; an empty one keeps the real manager out of it
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    return subprocess.run(["systemd-analyze", "--user", "verify", str(unit)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_unit_has_the_fields_a_login_service_needs():
    text = service.systemd_unit(MIRADORD, {"MIRADOR_HOME": "/srv/my home/100%", "XDG_DATA_HOME": "/d"})
    fields = unit_fields(text)
    assert fields["Service.ExecStart"] == [f'"{MIRADORD}"']
    assert fields["Service.Environment"] == ['"MIRADOR_HOME=/srv/my home/100%%"', '"XDG_DATA_HOME=/d"']
    assert fields["Service.Restart"] == ["on-failure"] and fields["Service.RestartSec"] == ["5"]
    assert fields["Service.RestartPreventExitStatus"] == ["2"]  # a config error: retrying cannot help
    assert fields["Service.KillMode"] == ["mixed"]
    assert fields["Install.WantedBy"] == ["default.target"]
    assert fields["Unit.Description"][0].startswith("Mirador")
    assert "Environment" not in service.systemd_unit(MIRADORD, {})


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (.ci/run installs it)")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    unit = tmp_path / service.UNIT_NAME
    unit.write_text(service.systemd_unit(MIRADORD, {"MIRADOR_HOME": "/srv/my home/100%", "XDG_STATE_HOME": "/s"}))
    result = verify(unit, tmp_path)
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings for systemd: none may name our unit.
    assert not [line for line in result.stderr.splitlines() if service.UNIT_NAME in line], result.stderr

    # The check has teeth: a unit whose program does not exist fails it.
    unit.write_text(service.systemd_unit("/nonexistent/miradord", {}))
    assert verify(unit, tmp_path).returncode != 0


def test_plist_round_trips_with_the_program_and_restart_on_failure():
    data = service.launchd_plist(MIRADORD, {"MIRADOR_HOME": "/Users/me/m"}, "/Users/me/m/state/miradord.stderr")
    agent = plistlib.loads(data)
    assert agent["Label"] == "ai.mirador.miradord"
    assert agent["ProgramArguments"] == [MIRADORD]
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["EnvironmentVariables"] == {"MIRADOR_HOME": "/Users/me/m"}
    assert agent["StandardErrorPath"] == "/Users/me/m/state/miradord.stderr"
    assert "EnvironmentVariables" not in plistlib.loads(service.launchd_plist(MIRADORD, {}, "/e"))


def test_service_env_passes_only_where_mirador_keeps_things():
    env = {"MIRADOR_HOME": "/m", "XDG_DATA_HOME": "/d", "PATH": "/bin", "MIRADOR_CONNECT": "tcp://h:1", "XDG_STATE_HOME": ""}
    assert service.service_env(env) == {"MIRADOR_HOME": "/m", "XDG_DATA_HOME": "/d"}


def home_env(tmp_path: Path, path_prefix: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MIRADOR_", "XDG_", "DBUS_")) and k != "HOME"}
    (tmp_path / "run").mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "cfg"), XDG_RUNTIME_DIR=str(tmp_path / "run"),
               MIRADOR_HOME=str(tmp_path / "m"))
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env.get('PATH', '')}"
    return env


def mirador(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mirador"), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd is Linux's")
def test_install_and_uninstall_without_a_user_manager(tmp_path):
    env = home_env(tmp_path)
    unit = tmp_path / "cfg" / "systemd" / "user" / service.UNIT_NAME

    installed = mirador(env, "service", "install")
    assert installed.returncode == 1  # written, but not enabled: it says so and what to run
    assert f"wrote {unit}" in installed.stdout
    assert "not enabled" in installed.stdout
    assert f"systemctl --user daemon-reload && systemctl --user enable --now {service.UNIT_NAME}" in installed.stdout
    fields = unit_fields(unit.read_text())
    assert fields["Service.ExecStart"] == [f'"{MIRADORD}"']
    assert f'"MIRADOR_HOME={tmp_path / "m"}"' in fields["Service.Environment"]
    assert "(present)" in mirador(env, "service", "status").stdout

    removed = mirador(env, "service", "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert f"removed {unit}" in removed.stdout and not unit.exists()
    assert "(absent)" in mirador(env, "service", "status").stdout


FAKE_SYSTEMCTL = """#!/bin/sh
# Stands in for a systemctl whose user manager answers; records each call.
echo "$*" >> "$(dirname "$0")/calls"
case "$2" in
  is-enabled) echo enabled ;;
  is-active) echo active ;;
esac
exit 0
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd is Linux's")
def test_install_enables_and_starts_when_the_user_manager_answers(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    env = home_env(tmp_path, str(bin_dir))
    unit = tmp_path / "cfg" / "systemd" / "user" / service.UNIT_NAME
    calls = bin_dir / "calls"

    installed = mirador(env, "service", "install")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert unit.exists() and "enabled and started" in installed.stdout
    assert calls.read_text().splitlines() == ["--user daemon-reload", f"--user enable --now {service.UNIT_NAME}"]

    status = mirador(env, "service", "status").stdout
    assert "enabled: enabled" in status and "active: active" in status

    calls.unlink()
    removed = mirador(env, "service", "uninstall")
    assert removed.returncode == 0
    assert calls.read_text().splitlines() == ["--user daemon-reload", f"--user disable --now {service.UNIT_NAME}",
                                              "--user daemon-reload"]
    assert not unit.exists() and "stopped and disabled" in removed.stdout


FAKE_LAUNCHCTL = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
exit 0
"""


def test_launchd_install_loads_the_agent_and_uninstall_unloads_it(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "launchctl").write_text(FAKE_LAUNCHCTL)
    (bin_dir / "launchctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    paths = Paths.from_env({"MIRADOR_HOME": str(tmp_path / "m")})
    agents = service.Launchd({"HOME": str(tmp_path)})
    plist = tmp_path / "Library" / "LaunchAgents" / "ai.mirador.miradord.plist"
    assert agents.path == plist

    assert agents.install(Path(MIRADORD), {"MIRADOR_HOME": str(tmp_path / "m")}, paths)
    assert plistlib.loads(plist.read_bytes())["ProgramArguments"] == [MIRADORD]
    assert agents.uninstall() and not plist.exists()
    assert (bin_dir / "calls").read_text().splitlines() == [f"load -w {plist}", f"unload -w {plist}"]
    out = capsys.readouterr().out
    assert f"wrote {plist}" in out and f"removed {plist}" in out
