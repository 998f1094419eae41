"""Starting a private local Ray for the daemon, or joining an existing cluster."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from mirador.client.paths import Paths

log = logging.getLogger("mirador.ray")

NAMESPACE = "mirador"


def ray_temp_dir(paths: Paths) -> Path:
    """A private Ray temp dir per daemon: short (Ray's unix sockets live under it) and stable."""
    digest = hashlib.sha1(str(paths.runtime).encode()).hexdigest()[:10]
    return Path(f"/tmp/mirador-ray-{digest}")


def start_ray(address: str, num_cpus: int, paths: Paths) -> tuple[str, bool]:
    """Start or join Ray. Returns (the cluster's GCS address, whether this process started it)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # local-first: no usage reports
    import ray

    common = dict(namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **common)
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
