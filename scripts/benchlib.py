"""What the benchmark scripts share: percentiles and a private daemon to measure against."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p95": pct(values, 0.95), "mean": statistics.fmean(values)}


def save(result: dict, path: str) -> None:
    """Write a benchmark's numbers as JSON (bench-results/ is git-ignored)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def new_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="mrb-", dir="/tmp"))


@contextlib.contextmanager
def private_daemon(extra_env: dict[str, str] | None = None, home: Path | None = None) -> Iterator[tuple[dict[str, str], object]]:
    """A miradord in a throw-away MIRADOR_HOME (``home``, or a new one; removed afterwards);
    yields (env, paths). MIRADOR_* config vars apply."""
    from mirador.client import daemon_control
    from mirador.client.paths import Paths

    home = home or new_home()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update({"MIRADOR_HTTP__LISTEN": "127.0.0.1:0"}, **(extra_env or {}), MIRADOR_HOME=str(home))  # a free port
    paths = Paths.from_env(env)
    print(f"starting a daemon in {home} ...", file=sys.stderr)
    proc = subprocess.Popen([str(BIN / "miradord")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        daemon_control.wait_ready(paths, proc)
        yield env, paths
    finally:
        daemon_control.stop(paths)
        shutil.rmtree(home, ignore_errors=True)
