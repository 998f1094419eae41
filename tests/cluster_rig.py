"""A Ray cluster on this machine (``ray.cluster_utils.Cluster``), run in its own process for a test.

Its own process, because a process holds one Ray configuration for life (token authentication
included) and the test process must stay clean for other test modules. It reads JSON commands,
one per line, on stdin and answers each with one JSON line on stdout:

  start:  argv[1] is {"head": {node args}, "nodes": {role: {node args}}}; first answer:
          {"address": GCS address, "nodes": {role: node id}}
  {"op": "add", "role": R, "args": {...}}                  -> {"node_id": ...}
  {"op": "remove", "role": R}                              -> {"ok": true}  (a graceful node exit)
  {"op": "kill", "name": actor name, "namespace": ns}      -> {"ok": true}  (ray.kill, restart allowed)

End of stdin shuts the cluster down. The environment (RAY_TMPDIR, RAY_AUTH_MODE, ...) is the
cluster's: every node inherits it.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    layout = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, connect=True, head_node_args=layout.get("head", {}))
    nodes = {"head": cluster.head_node}
    for role, args in layout.get("nodes", {}).items():
        nodes[role] = cluster.add_node(**args)

    def answer(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    answer({"address": cluster.address, "nodes": {role: node.node_id for role, node in nodes.items()}})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            try:
                if command["op"] == "add":
                    nodes[command["role"]] = cluster.add_node(**command.get("args", {}))
                    answer({"node_id": nodes[command["role"]].node_id})
                elif command["op"] == "remove":
                    cluster.remove_node(nodes.pop(command["role"]))
                    answer({"ok": True})
                elif command["op"] == "kill":
                    ray.kill(ray.get_actor(command["name"], namespace=command["namespace"]), no_restart=False)
                    answer({"ok": True})
                else:
                    answer({"error": f"unknown op {command['op']!r}"})
            except Exception as exc:  # the test sees it and fails with it
                answer({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
