"""Which machine an actor runs on, for ``mirador status`` (on a cluster, stages may be anywhere)."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray


def node_info() -> dict[str, Any]:
    """The Ray node, its IP address and host name, and the process of the caller (an actor, or a
    plain process using the same class outside Ray, which has no node id)."""
    return {
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
