"""A battery sensor for tests (``[energy] sensor = "tests.fake_battery:read"``): the reading is
whatever the JSON file named by MIRADOR_TEST_BATTERY says, null meaning no battery."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace


def read() -> SimpleNamespace | None:
    data = json.loads(Path(os.environ["MIRADOR_TEST_BATTERY"]).read_text())
    return None if data is None else SimpleNamespace(percent=data["percent"], power_plugged=data["plugged"])


def write(path: Path, percent: float | None = None, plugged: bool | None = None) -> None:
    path.write_text(json.dumps(None if percent is None else {"percent": percent, "plugged": plugged}))


def attach(home, path: Path, percent: float | None = 90, plugged: bool | None = True) -> Path:
    """Give a test daemon's home this sensor's reading file (written now) and let its Ray workers,
    which import the sensor, find the tests package."""
    write(path, percent, plugged)
    home.env.update(MIRADOR_TEST_BATTERY=str(path), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return path
