"""``AdapterStore``: the LoRA adapters trained for each embedded model, versioned, and which is active.

On disk, in the data dir: ``adapters/<model>/v<N>.gguf`` and ``adapters/<model>/state.json``
{active: N or null, versions: [{version, created, deployed, why, examples, held_out, general,
train, ...}]}. Every version a training run made is listed, deployed or not (with why); only
the files of deployed versions are kept (a rejected one is deleted once judged). The state file
is the one truth: the daemon writes it, and a stage actor reads it whenever it loads a model or
is told to switch, so an actor that Ray restarts comes back with the active adapter.
Writes go to a temporary file renamed over the old one: a crash leaves the old state or the new.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any


class AdapterStoreError(Exception):
    """A request the store cannot honour (no such version, nothing to roll back to); says why."""


def _safe(model: str) -> str:
    return re.sub(r"[^\w.+-]", "_", model)


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, model: str) -> Path:
        path = self.root / _safe(model)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def state(self, model: str) -> dict[str, Any]:
        path = self.root / _safe(model) / "state.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {"active": None, "versions": []}

    def _save(self, model: str, state: dict[str, Any]) -> None:
        path = self._dir(model) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)

    def path(self, model: str, version: int) -> Path:
        return self._dir(model) / f"v{version}.gguf"

    def next_version(self, model: str) -> int:
        """A version number no run of this model has used (the run writes ``path(model, it)``)."""
        used = [v["version"] for v in self.state(model)["versions"]]
        files = [int(m.group(1)) for f in self._dir(model).glob("v*.gguf*") if (m := re.match(r"v(\d+)\.gguf", f.name))]
        return max([0, *used, *files]) + 1

    def record(self, model: str, version: int, report: dict[str, Any], deploy: bool, why: str) -> dict[str, Any]:
        """File a run's outcome; ``deploy`` makes it the active adapter, else its file is removed."""
        state = self.state(model)
        entry = {"version": version, "created": time.time(), "deployed": deploy, "why": why, **report}
        state["versions"].append(entry)
        if deploy:
            state["active"] = version
        else:
            self.path(model, version).unlink(missing_ok=True)
        self._save(model, state)
        return entry

    def active(self, model: str) -> dict[str, Any] | None:
        """{version, path} of the adapter the model runs with, or None (the base model alone)."""
        version = self.state(model)["active"]
        if version is None:
            return None
        path = self.path(model, version)
        return {"version": version, "path": str(path)} if path.is_file() else None

    def history(self, model: str) -> list[dict[str, Any]]:
        return self.state(model)["versions"]

    def rollback(self, model: str, version: int | None = None) -> int:
        """Make ``version`` active (default: the deployed version before the active one); returns it."""
        state = self.state(model)
        deployed = [v["version"] for v in state["versions"] if v["deployed"] and self.path(model, v["version"]).is_file()]
        if version is None:
            earlier = [v for v in deployed if state["active"] is None or v < state["active"]]
            if not earlier:
                raise AdapterStoreError(f"{model} has no earlier adapter to roll back to; `mirador train off` "
                                        "runs the base model alone")
            version = earlier[-1]
        elif version not in deployed:
            raise AdapterStoreError(f"{model} has no deployed adapter v{version}; `mirador train history` lists them")
        state["active"] = version
        self._save(model, state)
        return version

    def off(self, model: str) -> None:
        """Run the base model alone (the versions stay; `rollback VERSION` brings one back)."""
        state = self.state(model)
        state["active"] = None
        self._save(model, state)
