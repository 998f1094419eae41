"""Starting a private local Ray for the daemon, or joining an existing cluster.

Joining assumes nothing about the cluster beyond its address: it may have been started by
``ray start --head`` (with any temp dir), by ``ray.cluster_utils.Cluster``, or by another tool;
the daemon only connects a driver to it and disconnects on shutdown, leaving the cluster up.
Clusters with token authentication need the same token in the daemon's environment, as Ray
reads it: ``RAY_AUTH_MODE=token`` and the token in ``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH``
or ``RAY_AUTH_TOKEN`` (with an explicit address Ray does not turn token mode on by itself).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from mirador.client.paths import Paths

log = logging.getLogger("mirador.ray")


class ClusterJoinError(Exception):
    """The daemon could not join the Ray cluster; the message says why and what to do."""


def ray_temp_dir(paths: Paths) -> Path:
    """A private Ray temp dir per daemon: short (Ray's unix sockets live under it) and stable."""
    digest = hashlib.sha1(str(paths.runtime).encode()).hexdigest()[:10]
    return Path(f"/tmp/mirador-ray-{digest}")


def _join_error(address: str, exc: BaseException) -> ClusterJoinError:
    causes = []
    while exc is not None:
        causes.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    text = "\n".join(causes)
    if "AuthenticationError" in text or "InvalidAuthToken" in text:
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        return ClusterJoinError(
            f"the Ray cluster at {address} requires token authentication and refused this daemon "
            f"(RAY_AUTH_MODE is {mode}): start miradord with RAY_AUTH_MODE=token and the cluster's token in "
            "~/.ray/auth_token, in the file named by RAY_AUTH_TOKEN_PATH, or in RAY_AUTH_TOKEN "
            "(`ray get-auth-token` on the head node prints it)"
        )
    return ClusterJoinError(f"could not join the Ray cluster at {address}: {causes[-1] if causes else text} "
                            "(is it running? `ray status --address ADDRESS` on this machine should answer)")


def start_ray(address: str, num_cpus: int, paths: Paths, namespace: str = "mirador") -> tuple[str, bool]:
    """Start or join Ray. Returns (the cluster's GCS address, whether this process started it)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # local-first: no usage reports
    import ray

    common = dict(namespace=namespace, logging_level=logging.WARNING, log_to_driver=False)
    if address:
        log.info("joining the Ray cluster at %s", address)
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError) as exc:
            raise _join_error(address, exc) from None
        started = False
    else:
        temp = ray_temp_dir(paths)
        temp.mkdir(mode=0o700, exist_ok=True)
        # A file left by a Ray that was killed makes the next start try to reach it and hang.
        (temp / "ray_current_cluster").unlink(missing_ok=True)
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _temp_dir=str(temp),
            **common,
        )
        started = True
    return ray.get_runtime_context().gcs_address, started
