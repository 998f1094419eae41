"""Configuration: shipped defaults, then the user's files, then MIRADOR_* environment variables.

Each ``config/NAME.toml`` shipped with Mirador can be overridden key by key by
``$XDG_CONFIG_HOME/mirador/NAME.toml``. Environment variables ``MIRADOR_SECTION__KEY[__KEY]``
override single keys; their values are read as TOML (``64``, ``true``, ``"text"``), falling back
to a plain string.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mirador.client.paths import Paths

ENV_PREFIX = "MIRADOR_"


class ConfigError(Exception):
    """The configuration is wrong; the message says where."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the model manifest (config/models.toml)."""

    name: str
    backend: str  # "llamacpp" | "ollama"
    source: str
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific (n_ctx, host, ...)


@dataclass(frozen=True)
class StageConfig:
    """One stage: which model answers, with what prompt and limits."""

    name: str
    model: str
    system_prompt: str
    max_tokens: int
    temperature: float
    confidence_prior: float


@dataclass(frozen=True)
class Config:
    """The daemon's whole configuration, validated."""

    log_level: str
    ray_address: str
    ray_num_cpus: int
    stages: dict[str, StageConfig]  # in answering order
    models: dict[str, ModelSpec]
    raw: dict[str, Any]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__")]
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


def load_raw(paths: Paths, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge the shipped defaults, the user's files and the environment into one dict."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    for default in sorted(resources.files("mirador.config").iterdir(), key=lambda p: p.name):
        if default.name.endswith(".toml"):
            merged = deep_merge(merged, tomllib.loads(default.read_text()))
            user = paths.config / default.name
            if user.is_file():
                merged = deep_merge(merged, _read_toml(user))
    return deep_merge(merged, _env_overrides(env))


def load_config(paths: Paths, env: dict[str, str] | None = None) -> Config:
    raw = load_raw(paths, env)
    models = {}
    for name, spec in raw.get("models", {}).items():
        spec = dict(spec)
        backend, source = spec.pop("backend", None), spec.pop("source", None)
        if backend not in ("llamacpp", "ollama"):
            raise ConfigError(f"models.{name}.backend must be 'llamacpp' or 'ollama', not {backend!r}")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"models.{name}.source is missing")
        models[name] = ModelSpec(name, backend, source, spec)

    stages_raw = raw.get("stages", {})
    order = stages_raw.get("order") or [k for k, v in stages_raw.items() if isinstance(v, dict)]
    stages = {}
    for name in order:
        s = stages_raw.get(name)
        if not isinstance(s, dict):
            raise ConfigError(f"stages.order names {name!r} but there is no [stages.{name}] table")
        if s.get("model") not in models:
            raise ConfigError(f"stages.{name}.model {s.get('model')!r} is not a model in models.toml ({', '.join(models)})")
        try:
            stages[name] = StageConfig(
                name=name,
                model=s["model"],
                system_prompt=str(s.get("system_prompt", "")),
                max_tokens=int(s.get("max_tokens", 256)),
                temperature=float(s.get("temperature", 0.7)),
                confidence_prior=float(s.get("confidence_prior", 0.6)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"stages.{name}: {exc}") from None
    if not stages:
        raise ConfigError("no stages configured")

    ray = raw.get("ray", {})
    return Config(
        log_level=str(raw.get("daemon", {}).get("log_level", "info")),
        ray_address=str(ray.get("address", "")),
        ray_num_cpus=int(ray.get("num_cpus", 0)),
        stages=stages,
        models=models,
        raw=raw,
    )
