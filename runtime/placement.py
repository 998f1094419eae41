"""Where each of the daemon's actors runs, and how it comes back after a failure.

Every actor is named after its key (``stage:quick``, ``model:NAME``, ``memory``, ``learner``,
``energy``) in the daemon's Ray namespace (``[ray] namespace``), so that a process joined to the
same cluster can find it with ``ray.get_actor(name, namespace=...)``.

Where: an actor without a placement is pinned to the daemon's own node (local-first: joining a
cluster moves nothing by itself). A stage or the memory store with ``placement`` goes to any
node that has the custom resources and matches the label selector; Ray picks again among those
nodes when the actor has to come back.

Coming back: actors restart without limit after a crash or the loss of their node
(``max_restarts=-1``): construction loads no model, so a restart cannot crash-loop by itself,
and a long-running daemon should not lose a stage for good after a few node hiccups. Calls are
never retried by Ray (``max_task_retries=0``): a generation that dies half-way must not start
over and send its tokens twice. The orchestrator decides instead (see ``Orchestrator._open``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import ConfigError, Placement


RETRY_PAUSE_S = 0.25  # between calls to an actor that Ray is restarting


async def call_while_restarting(call: Callable[[], Any], wait_s: float) -> Any:
    """Await ``call()`` (an actor call), sending it again while the actor is down and Ray
    restarts it, for up to ``wait_s``. Only for calls that are harmless to run twice (reads,
    upserts, deletes): a call that failed may have run before its actor died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            return await call()
        except ray.exceptions.RayActorError:
            if loop.time() + RETRY_PAUSE_S >= deadline:
                raise
            await asyncio.sleep(RETRY_PAUSE_S)


class ClusterError(Exception):
    """The daemon cannot start its actors on this Ray cluster; the message says why and what to do."""


def actor_options(name: str, placement: Placement, namespace: str) -> dict[str, Any]:
    options: dict[str, Any] = {"name": name, "namespace": namespace, "max_restarts": -1, "max_task_retries": 0}
    if placement.local:
        here = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    if placement.resources:
        options["resources"] = dict(placement.resources)
    if placement.labels:
        options["label_selector"] = dict(placement.labels)
    return options


def create(actor_class: Any, name: str, placement: Placement, namespace: str, where: str, *args: Any) -> Any:
    """Start one named actor. ``where`` is the config key its placement came from, for errors."""
    try:
        configured = actor_class.options(**actor_options(name, placement, namespace))
    except ValueError as exc:  # Ray's own check of resource names and label selectors
        raise ConfigError(f"{where}: {exc}") from None
    try:
        return configured.remote(*args)
    except ray.exceptions.ActorAlreadyExistsError:
        raise ClusterError(
            f"an actor named {name!r} already runs in Ray namespace {namespace!r} on this cluster: another "
            "Mirador daemon uses it; give this daemon its own with [ray] namespace in mirador.toml "
            "(or MIRADOR_RAY__NAMESPACE)"
        ) from None
