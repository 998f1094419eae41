"""Power profiles: the monitor's rules with readings injected at the sensor, and a real daemon's plans."""

from __future__ import annotations

import time

import pytest

from mirador.actors.energy import Energy, forced_profile

from . import fake_battery
from .conftest import make_home, start_daemon, stop_daemon

COMPLEX = ("Compare PostgreSQL and MongoDB for a distributed architecture: what are the trade-offs "
           "in latency and scalability, and which should a small team pick?")


@pytest.fixture
def battery(tmp_path, monkeypatch):
    path = tmp_path / "battery.json"
    monkeypatch.setenv("MIRADOR_TEST_BATTERY", str(path))
    return path


@pytest.mark.parametrize("reading, profile", [
    ((None, None), "maximum"),   # no battery: a desktop
    ((100, True), "maximum"),
    ((15, True), "maximum"),     # plugged in, however low
    ((60, False), "balanced"),
    ((20, False), "balanced"),
    ((19.5, False), "minimal"),
])
def test_profiles_follow_the_battery(battery, reading, profile):
    fake_battery.write(battery, *reading)
    state = Energy("tests.fake_battery:read", low_battery_percent=20).read()
    assert state["profile"] == profile and state["forced"] is False


def test_a_forced_profile_wins_and_a_wrong_one_is_refused(battery):
    fake_battery.write(battery, 90, True)
    state = Energy("tests.fake_battery:read", forced=forced_profile({"MIRADOR_POWER_PROFILE": "minimal"})).read()
    assert state["profile"] == "minimal" and state["measured"] == "maximum" and state["forced"] is True
    with pytest.raises(ValueError, match="use one of maximum, balanced, minimal"):
        forced_profile({"MIRADOR_POWER_PROFILE": "turbo"})
    assert forced_profile({}) is None


def test_a_broken_sensor_means_mains_power(battery):
    battery.write_text("{not json")
    state = Energy("tests.fake_battery:read").read()
    assert state["profile"] == "maximum" and "JSONDecodeError" in state["sensor_error"]


def test_the_daemon_plans_by_power_profile(battery):
    home = make_home({"mirador.toml": '[energy]\nsensor = "tests.fake_battery:read"\npoll_s = 0.2\n'})
    fake_battery.attach(home, battery, 80, True)
    d = start_daemon(home)
    try:
        def plan_on(percent, plugged, profile):
            fake_battery.write(battery, percent, plugged)
            with home.client(idle_timeout=120) as client:
                deadline = time.monotonic() + 10
                while client.status()["power"]["profile"] != profile:
                    assert time.monotonic() < deadline, f"the daemon never switched to {profile}"
                    time.sleep(0.1)
                events = list(client.ask(COMPLEX, max_tokens=4, memory=False))
            return events[0]

        full = plan_on(80, True, "maximum")
        assert full["stages"] == ["quick", "deep", "synthesis"] and full["power"]["changed"] is False
        on_battery = plan_on(50, False, "balanced")
        assert on_battery["stages"] == ["quick", "synthesis"]
        assert on_battery["power"]["changed"] is True and on_battery["power"]["dropped"] == ["deep"]
        low = plan_on(10, False, "minimal")
        assert low["stages"] == ["quick"] and low["power"]["battery"] == {"percent": 10, "plugged": False}
        assert "minimal" in home.mirador("status").stdout
        assert plan_on(None, None, "maximum")["stages"] == ["quick", "deep", "synthesis"]  # no battery
    finally:
        stop_daemon(d)


def test_minimal_picks_each_stages_smallest_model(tmp_path):
    from mirador.client.paths import Paths
    from mirador.runtime.config import load_config
    from mirador.runtime.orchestrator import Orchestrator

    paths = Paths.from_env({"MIRADOR_HOME": str(tmp_path)})
    paths.config.mkdir(parents=True)
    (paths.config / "models.toml").write_text('[models.tiny]\nbackend = "llamacpp"\nsource = "/x/tiny.gguf"\nsize_mb = 50\n')
    (paths.config / "mirador.toml").write_text('[stages.quick]\nmodels = ["smollm2-135m", "tiny"]\n')
    orchestrator = Orchestrator(load_config(paths, env={}), actors={})
    orchestrator.power = {"profile": "minimal", "battery": {"percent": 5, "plugged": False}}
    ask = orchestrator.new_ask({"id": "a", "text": COMPLEX})
    info = orchestrator._apply_power(ask)
    assert [s.name for s in ask.steps] == ["quick"] and ask.steps[0].models == ("tiny", "smollm2-135m")
    assert info["changed"] and info["dropped"] == ["deep", "synthesis"] and info["models"] == {"quick": "tiny"}
