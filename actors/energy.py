"""``EnergyMonitor``: which power profile the machine is in, from its battery.

Profiles: ``maximum`` (plugged in, or no battery at all), ``balanced`` (on battery),
``minimal`` (on battery below ``low_battery_percent``). ``MIRADOR_POWER_PROFILE`` forces one.
The battery is read through a *sensor*: a function returning an object with ``percent`` and
``power_plugged`` (like ``psutil.sensors_battery()``), or None when there is no battery. The
default is psutil's; ``[energy] sensor = "module:function"`` names another (a desktop's UPS,
or a test's stand-in), which is also where readings are injected in tests.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

import ray

PROFILES = ("maximum", "balanced", "minimal")
FORCE_ENV = "MIRADOR_POWER_PROFILE"


def load_sensor(spec: str) -> Callable[[], Any]:
    """``"psutil"`` or ``"module:function"``."""
    if spec == "psutil":
        import psutil

        return psutil.sensors_battery
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def profile_for(reading: Any, low_battery_percent: float) -> str:
    if reading is None or reading.power_plugged or reading.percent is None:  # no battery, or on mains
        return "maximum"
    return "minimal" if reading.percent < low_battery_percent else "balanced"


def forced_profile(env: dict[str, str] | None = None) -> str | None:
    value = (os.environ if env is None else env).get(FORCE_ENV, "").strip().lower()
    if value and value not in PROFILES:
        raise ValueError(f"{FORCE_ENV}={value!r} is not a profile; use one of {', '.join(PROFILES)}")
    return value or None


class Energy:
    """Reads the sensor and names the profile; ``EnergyMonitor`` is this class as a Ray actor."""

    def __init__(self, sensor: str = "psutil", low_battery_percent: float = 20.0, forced: str | None = None):
        self._sensor = load_sensor(sensor)
        self.low_battery_percent, self.forced = low_battery_percent, forced

    def read(self) -> dict[str, Any]:
        """Read the battery now: {profile, measured, forced, battery: {percent, plugged} | None, sensor_error}."""
        try:
            reading, error = self._sensor(), None
        except Exception as exc:  # a broken sensor must not stop answers: assume mains power
            reading, error = None, f"{type(exc).__name__}: {exc}"
        battery = None if reading is None else {"percent": reading.percent, "plugged": reading.power_plugged}
        measured = profile_for(reading, self.low_battery_percent)
        return {"profile": self.forced or measured, "measured": measured, "forced": self.forced is not None,
                "battery": battery, "sensor_error": error}


EnergyMonitor = ray.remote(num_cpus=0)(Energy)
