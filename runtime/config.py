"""Configuration: shipped defaults, then the user's files, then MIRADOR_* environment variables.

Each ``config/NAME.toml`` shipped with Mirador can be overridden key by key by
``$XDG_CONFIG_HOME/mirador/NAME.toml``. Environment variables ``MIRADOR_SECTION__KEY[__KEY]``
override single keys; their values are read as TOML (``64``, ``true``, ``"text"``,
``["a", "b"]``), falling back to plain text. The merged result is checked against the schema
(runtime/config_schema.py: every key, its type and range; add keys there) and then here, for what
relates keys to each other (a stage naming a model). Every error names the key's dotted path and
where its value came from, and an unknown key is answered with the nearest valid name.

This module imports nothing heavy (pydantic, the client's paths), so the ``mirador`` CLI can use
it (``mirador config show``), imported lazily.
"""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pydantic import BaseModel, ValidationError

from mirador.client.paths import Paths

from .config_schema import (
    BACKENDS, ChainConfig, ChainStep, Config, EnergyConfig, HttpConfig, MemoryConfig, ModelSpec, Placement, PowerLimits,
    PreloadConfig, StageConfig,
)

# The rest of the code imports the config's classes from here.
__all__ = ["http_override", "ChainConfig", "ChainStep", "Config", "ConfigError", "EnergyConfig", "HttpConfig", "Loaded", "MemoryConfig", "ModelSpec",
           "Placement", "PowerLimits", "PreloadConfig", "StageConfig", "load", "load_config"]

ENV_PREFIX = "MIRADOR_"
DEFAULT = "default"  # the source of a value from Mirador's shipped files or the schema's defaults

Path_ = tuple[str | int, ...]  # a key's path: ("stages", "quick", "max_tokens")


class ConfigError(Exception):
    """The configuration is wrong; the message says where."""


@dataclass(frozen=True)
class Layer:
    """One source of configuration values: a shipped file, a user file, or one environment variable."""

    source: str  # DEFAULT, the user file's path, or the variable's name
    values: dict[str, Any]


@dataclass(frozen=True)
class Loaded:
    """A checked configuration and where each of its values came from."""

    config: Config
    sources: dict[str, str]  # dotted key -> DEFAULT, a user file's path, or an environment variable's name

    def source_of(self, key: str) -> str:
        """The source of ``key``'s value (or of the table or list it is part of)."""
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0] if "." in key else ""
        return DEFAULT

    def effective(self) -> dict[str, Any]:
        """The configuration in use, as nested tables (stages with their ``order``; unset backend options left out)."""
        tables = self.config.model_dump(mode="json", exclude_none=True)
        tables["stages"] = {"order": list(self.config.stages), **tables["stages"]}
        return tables

    def entries(self) -> list[tuple[str, Any, str]]:
        """Every key in use: (dotted key, value, source), in file order."""
        out: list[tuple[str, Any, str]] = []

        def walk(value: Any, key: str) -> None:
            if isinstance(value, dict) and value:
                for name, item in value.items():
                    walk(item, f"{key}.{name}" if key else name)
            else:
                out.append((key, value, self.source_of(key)))

        walk(self.effective(), "")
        return out


def dotted(path: Path_) -> str:
    """``("chains", "x", "steps", 1, "model")`` -> ``chains.x.steps[1].model``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


# --- reading the layers -----------------------------------------------------------------------

def _read_toml(path: Any) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _env_value(text: str) -> Any:
    """An environment variable's value: TOML when it parses, else the text. A number or true/false
    stays text, so that the schema converts it to the key's own type ("64" is 64 for a number and
    "64" for a name; "false", "no", "0" are False for a switch)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return value if isinstance(value, (str, list, dict)) else text.strip()


def env_layers(env: dict[str, str] | os._Environ[str]) -> list[Layer]:
    """One layer per ``MIRADOR_SECTION__KEY[__KEY]`` variable (names without ``__`` are not config)."""
    layers = []
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        *parents, last = [k.lower() for k in name[len(ENV_PREFIX):].split("__")]
        values: dict[str, Any] = {last: _env_value(text)}
        for key in reversed(parents):
            values = {key: values}
        layers.append(Layer(name, values))
    return layers


def read_layers(paths: Paths, env: dict[str, str] | None = None) -> list[Layer]:
    """The shipped defaults and the user's file for each config file, then the environment."""
    layers = []
    for default in sorted(resources.files("mirador.config").iterdir(), key=lambda p: p.name):
        if default.name.endswith(".toml"):
            layers.append(Layer(DEFAULT, tomllib.loads(default.read_text())))
            user = paths.config / default.name
            if user.is_file():
                layers.append(Layer(str(user), _read_toml(user)))
    return layers + env_layers(os.environ if env is None else env)


def merge(layers: list[Layer]) -> tuple[dict[str, Any], dict[Path_, str]]:
    """Merge the layers key by key (tables merge, anything else replaces) and note each value's source."""
    merged: dict[str, Any] = {}
    sources: dict[Path_, str] = {}

    def note(value: Any, path: Path_, source: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                note(item, (*path, key), source)
        else:
            sources[path] = source

    def into(base: dict[str, Any], override: dict[str, Any], prefix: Path_, source: str) -> None:
        for key, value in override.items():
            path = (*prefix, key)
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                into(base[key], value, path, source)
            else:
                for old in [p for p in sources if p[:len(path)] == path]:
                    del sources[old]
                base[key] = copy.deepcopy(value)
                note(value, path, source)

    for layer in layers:
        into(merged, layer.values, (), layer.source)
    return merged, sources


# --- checking -----------------------------------------------------------------------------------

def load_config(paths: Paths, env: dict[str, str] | None = None) -> Config:
    """The checked configuration; a ConfigError names each wrong key, what is wrong and its source."""
    return load(paths, env).config


def load(paths: Paths, env: dict[str, str] | None = None) -> Loaded:
    """Like ``load_config``, with where each value came from (``mirador config show``)."""
    raw, sources = merge(read_layers(paths, env))
    config = _validate(raw, sources)
    _check_references(config)
    return Loaded(config, {dotted(p): s for p, s in sources.items()})


def _validate(raw: dict[str, Any], sources: dict[Path_, str]) -> Config:
    data = dict(raw)
    order = None
    if isinstance(raw.get("stages"), dict):
        tables = dict(raw["stages"])
        order = tables.pop("order", None)
        for key, value in tables.items():  # a stage is a table; anything else is a misspelt `order` or a mistake
            if not isinstance(value, dict):
                what = "unknown key; did you mean order?" if _close(key, ["order"]) else f"a stage must be a table, [stages.{key}]"
                raise ConfigError(f"stages.{key}: {what}{_where(('stages', key), sources)}")
        data["stages"] = tables
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(exc, sources))) from None
    if order is not None:
        if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
            raise ConfigError(f"stages.order: must be a list of stage names, not {order!r}{_where(('stages', 'order'), sources)}")
        for name in order:
            if name not in config.stages:
                raise ConfigError(f"stages.order names {name!r} but there is no [stages.{name}] table"
                                  f"{_suggest(name, list(config.stages))}{_where(('stages', 'order'), sources)}")
        config = config.model_copy(update={"stages": {name: config.stages[name] for name in order}})
    config._raw = raw
    return config


def _check_references(config: Config) -> None:
    """What the schema cannot see: names that must refer to other parts of the config."""
    stages, models = config.stages, config.models
    if not stages:
        raise ConfigError("no stages configured")
    for name, stage in stages.items():
        missing = [m for m in stage.models if m not in models]
        if missing:
            raise ConfigError(f"stages.{name}.models {missing!r}: not models in models.toml ({', '.join(models)})"
                              f"{_close(missing[0], list(models))}")
    for stage in stages.values():
        for other in (*stage.needs, *filter(None, [stage.after_first_token_of])):
            if other not in stages or list(stages).index(other) >= list(stages).index(stage.name):
                raise ConfigError(f"stages.{stage.name} depends on {other!r}, which must be a stage listed before it")
    for model in models.values():
        if [r for r in model.roles if r not in stages]:
            raise ConfigError(f"models.{model.name}.roles names unknown stages {list(model.roles)}; configured: {list(stages)}")
    for kind, listed in config.routes.items():
        unknown = [s for s in listed if s not in stages]
        if unknown:
            raise ConfigError(f"routing.{kind} names unknown stages {unknown}; configured: {list(stages)}")
    for name, chain in config.chains.items():
        for i, step in enumerate(chain.steps):
            if step.model not in models:
                raise ConfigError(f"chains.{name}.steps[{i}].model: {step.model!r} (step {step.name!r}) is not in "
                                  f"models.toml{_close(step.model, list(models))}")
    for profile, limits in config.energy.limits.items():
        if limits.stages is not None and [s for s in limits.stages if s not in stages]:
            raise ConfigError(f"energy.{profile}.stages names unknown stages {list(limits.stages)}; configured: {list(stages)}")


# --- wording pydantic's errors -------------------------------------------------------------------

_TYPE_WORDS = {
    "string_type": "must be a string (text in quotes)",
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "list_type": "must be a list", "tuple_type": "must be a list",
    "dict_type": "must be a table", "model_type": "must be a table", "model_attributes_type": "must be a table",
}


def _close(word: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(word), valid, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _suggest(word: str, valid: list[str]) -> str:
    """The nearest valid name, else the valid names."""
    return _close(word, valid) or (f"; valid: {', '.join(valid)}" if valid else "")


def _where(path: Path_, sources: dict[Path_, str]) -> str:
    """`` (from MIRADOR_X__Y)`` or `` (in FILE)``: where the value at ``path`` came from, else the
    nearest table around it (for a missing key: where its table was written)."""
    source = None
    for n in range(len(path), 0, -1):
        source = sources.get(path[:n]) or next((s for p, s in sources.items() if p[:n] == path[:n]), None)
        if source is not None:
            break
    if source is None or source == DEFAULT:
        return "" if source is None else " (in Mirador's shipped defaults)"
    return f" (from {source})" if source.startswith(ENV_PREFIX) else f" (in {source})"


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _keys(model: Any) -> list[str]:
    """The keys a table of this schema class may hold."""
    if not _is_model(model):
        return []
    return [f.alias or name for name, f in model.model_fields.items() if not (f.alias or name).startswith("__")]


def _locate(loc: tuple[Any, ...]) -> tuple[Path_, Any]:
    """A pydantic error location as the key's path (without the union tags pydantic adds), and the
    schema type of the table holding the last key."""
    path: list[str | int] = []
    tp: Any = Config
    parent: Any = None
    items = list(loc)
    while items:
        item = items[0]
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            members = [m for m in typing.get_args(tp) if m is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
            # pydantic names the member that failed (a backend tag, or a type): not part of the key
            tp = next((m for m in map(_unwrap, members) if _is_model(m) and "backend" in m.model_fields
                       and item in typing.get_args(m.model_fields["backend"].annotation)), None)
            items.pop(0)
            continue
        parent = tp
        path.append(item)
        items.pop(0)
        if _is_model(tp):
            field = next((f for name, f in tp.model_fields.items() if item in (name, f.alias)), None)
            tp = field.annotation if field else None
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif origin in (tuple, list):
            tp = typing.get_args(tp)[0]
        else:
            tp = None
    return tuple(path), parent


def _describe(exc: ValidationError, sources: dict[Path_, str]) -> list[str]:
    """One line per wrong key: ``stages.quick.max_token: unknown key; did you mean max_tokens? (in FILE)``."""
    found: dict[Path_, tuple[list[str], str]] = {}  # path -> (what is wrong, the value given)
    located = [(error, *_locate(error["loc"])) for error in exc.errors()]
    # A misspelt required key is also reported missing; "did you mean" already says it.
    meant = {(*path[:-1], m) for error, path, parent in located if error["type"] == "extra_forbidden"
             for m in difflib.get_close_matches(str(path[-1]), _keys(parent), n=1)}
    for error, path, parent in located:
        if error["type"] == "missing" and path in meant:
            continue
        kind, given, ctx = error["type"], error.get("input"), error.get("ctx", {})
        shown = repr(given) if len(repr(given)) <= 60 else repr(given)[:57] + "..."
        if kind == "extra_forbidden":
            what, shown = f"unknown key{_suggest(str(path[-1]), _keys(parent))}", ""
        elif kind == "union_tag_invalid":
            path, shown = (*path, "backend"), ""
            what = f"must be one of {', '.join(BACKENDS)}, not {ctx['tag']!r}{_close(ctx['tag'], list(BACKENDS))}"
        elif kind == "union_tag_not_found":
            path, shown = (*path, "backend"), ""
            what = f"missing: say which backend runs the model ({', '.join(BACKENDS)})"
        elif kind == "missing":
            what, shown = "missing: this key is required", ""
        elif kind == "literal_error":
            valid = [v.strip("'") for v in ctx["expected"].replace(" or ", ", ").split(", ")]
            what, shown = f"must be one of {', '.join(valid)}, not {shown}{_close(str(given), valid)}", ""
        elif kind in ("too_short", "string_too_short"):
            what, shown = "must not be empty", ""
        elif kind in _TYPE_WORDS:
            what = _TYPE_WORDS[kind]
        elif kind == "value_error":
            what, shown = error["msg"].removeprefix("Value error, "), ""
        else:  # ranges: "Input should be greater than 0" -> "must be greater than 0"
            what = error["msg"].replace("Input should be", "must be")
        whats, _ = found.setdefault(path, ([], shown))
        whats.append(what)
    return [f"{dotted(path)}: {_either(whats)}{f', not {shown}' if shown else ''}{_where(path, sources)}"
            for path, (whats, shown) in found.items()]


def _either(whats: list[str]) -> str:
    """"must be a number" and "must be text" (a union's members) -> "must be a number or text"."""
    whats = list(dict.fromkeys(whats))
    if len(whats) > 1 and all(w.startswith("must be ") for w in whats):
        return "must be " + " or ".join(w.removeprefix("must be ") for w in whats)
    return " or ".join(whats)


def http_override(http: HttpConfig, listen: str) -> HttpConfig:
    """``[http]`` with ``listen`` from ``miradord --http``, checked like the key."""
    try:
        return HttpConfig.model_validate({**http.model_dump(), "listen": listen})
    except ValidationError as exc:
        raise ConfigError(f"--http: {exc.errors()[0]['msg'].removeprefix('Value error, ')}, not {listen!r}") from None
