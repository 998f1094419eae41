"""Several machines, on one: a real Ray cluster (``ray.cluster_utils.Cluster``: a head and extra
nodes with custom resources and labels) that a real miradord joins with token authentication.

Layout (node → what the config places there):
  head    the daemon's driver; quick, learner, energy, stalled (no placement: the daemon's node)
  gpu-a   resources gpu_box=1     deep (``placement = {resources = {gpu_box = 0.001}}``) lands on
  gpu-b   resources gpu_box=1     one of these two, and moves to the other when its node goes
  store   labels mirador-role=store   synthesis, memory, ollama and flaky (label selector)

The Ollama stages talk to no real Ollama (none can be installed here): ``ollama`` to an address
where nothing listens, ``flaky`` and ``stalled`` to a small server in this process that speaks
Ollama's streaming format and then drops the connection, or stops sending.

The tests run in file order and share the cluster: the node tests remove nodes as they go.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from mirador.actors.stage import StageActor
from mirador.runtime.config import ConfigError, Placement, load_config
from mirador.runtime.placement import create

from .conftest import BIN, make_home, start_daemon, stop_daemon

COMPLEX = "Compare solar and wind power: what are the trade-offs in cost and reliability?"
LONG = "Write a long, detailed essay about the history of astronomy, from ancient times to today."

CONFIG = """
[ray]
actor_wait_s = 6

[stages]
order = ["quick", "deep", "synthesis", "ollama", "flaky", "stalled"]

[stages.deep]
placement = {resources = {gpu_box = 0.001}}

[stages.synthesis]
placement = {labels = {"mirador-role" = "store"}}

[stages.ollama]
models = ["llama3-2-1b"]
placement = {labels = {"mirador-role" = "store"}}

[stages.flaky]
models = ["dies"]
placement = {labels = {"mirador-role" = "store"}}

[stages.stalled]
models = ["stalls"]
timeout_s = 2

[memory]
placement = {labels = {"mirador-role" = "store"}}
"""

MODELS = """
[models.dies]
backend = "ollama"
source = "dies:latest"
host = "{host}"

[models.stalls]
backend = "ollama"
source = "stalls:latest"
host = "{host}"
"""


class BrokenOllama(BaseHTTPRequestHandler):
    """Ollama's wire format up to a point: ``dies:latest`` streams two tokens and drops the
    connection; ``stalls:latest`` streams one token and then sends nothing more."""

    stop = threading.Event()

    def log_message(self, *args):
        pass

    def _json(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # /api/ps: nothing loaded
        self._json({"models": []})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body["model"]
        if not body.get("messages"):  # a load request
            return self._json({"model": model, "created_at": "2026-11-21T10:00:00Z", "done": True,
                               "message": {"role": "assistant", "content": ""}, "done_reason": "load"})
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for text in ["The", " sky"][: 2 if model == "dies:latest" else 1]:
            line = (json.dumps({"model": model, "created_at": "2026-11-21T10:00:00Z", "done": False,
                                "message": {"role": "assistant", "content": text}}) + "\n").encode()
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
        if model == "stalls:latest":
            self.stop.wait()  # the connection stays open, silent
        self.connection.shutdown(socket.SHUT_RDWR)  # gone mid-stream: no last chunk


@pytest.fixture(scope="module")
def broken_ollama():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenOllama)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    BrokenOllama.stop.set()
    server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rig:
    """The cluster (run by tests/cluster_rig.py in its own process), its nodes, and the daemon that joined it."""

    def __init__(self, env: dict[str, str], layout: dict):
        with open(Path(env["RAY_TMPDIR"]) / "rig.stderr", "w") as stderr:
            self.proc = subprocess.Popen([str(BIN / "python"), str(Path(__file__).with_name("cluster_rig.py")),
                                          json.dumps(layout)],
                                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        started = self._answer()
        self.address, self.nodes = started["address"], started["nodes"]  # role -> node id
        self.daemon = self.refused = None  # the joined daemon; (a refused one, its stderr file)
        self.ollama_host = self.broken_ollama = ""  # where the Ollama stages look

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the cluster process ended; see {self.proc.args[1]}'s stderr under RAY_TMPDIR"
        answer = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer

    def command(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def add_node(self, role: str, **args) -> None:
        self.nodes[role] = self.command(op="add", role=role, args=args)["node_id"]

    def remove_node(self, role: str) -> None:
        self.command(op="remove", role=role)
        del self.nodes[role]

    def close(self) -> None:
        self.proc.stdin.close()  # the rig shuts its cluster down
        self.proc.wait(timeout=120)

    # -- the daemon's side ----------------------------------------------------------------
    def ask(self, text, **kwargs):
        with self.daemon.home.client(idle_timeout=120) as client:
            return list(client.ask(text, memory=False, **kwargs))

    def status(self):
        with self.daemon.home.client() as client:
            return client.status()

    def actor(self, name):
        return next(a for a in self.status()["actors"] if a["name"] == name)

    def node_of(self, node_id):
        return next(role for role, node in self.nodes.items() if node == node_id)


@pytest.fixture(scope="module")
def rig(broken_ollama):
    temp = tempfile.mkdtemp(prefix="mcl-", dir="/tmp")  # short: Ray's unix sockets live under it
    token = secrets.token_hex(16)
    # Nothing listens there: an Ollama stage that uses it fails at once, saying where it looked.
    ollama_host = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MIRADOR_", "XDG_"))}
    env.update(RAY_TMPDIR=temp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               OLLAMA_HOST=ollama_host)
    # A dead node is noticed after 2 missed health checks of 0.5 s (Ray's default is 5 of 3 s).
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}
    layout = {"head": {"num_cpus": 1, "include_dashboard": False, "_system_config": health},
              "nodes": {"gpu-a": {"num_cpus": 1, "resources": {"gpu_box": 1}},
                        "gpu-b": {"num_cpus": 1, "resources": {"gpu_box": 1}},
                        "store": {"num_cpus": 1, "labels": {"mirador-role": "store"}}}}
    rig = Rig(env, layout)
    refused = outsider = None
    try:
        # A daemon without the cluster's token is refused; it takes Ray ~20 s to give up, so it
        # tries while the other daemon starts, and a test below reads how it failed.
        outsider = make_home()
        outsider.env.update(MIRADOR_RAY__ADDRESS=rig.address, MIRADOR_MEMORY__ENABLED="false")
        outsider.paths.ensure()
        with open(outsider.root / "stderr", "w") as stderr:  # a file: a full pipe would block it
            refused = subprocess.Popen([str(BIN / "miradord")], env=outsider.env, stdout=subprocess.DEVNULL, stderr=stderr)
        rig.refused = (refused, outsider.root / "stderr")

        home = make_home({"mirador.toml": CONFIG, "models.toml": MODELS.replace("{host}", broken_ollama)})
        # Joining needs the same token; OLLAMA_HOST stays out, so only the cluster's nodes know it.
        home.env.update(MIRADOR_RAY__ADDRESS=rig.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        home.env.pop("OLLAMA_HOST", None)
        rig.ollama_host, rig.broken_ollama = ollama_host, broken_ollama
        rig.daemon = start_daemon(home)
        yield rig
    finally:
        if rig.daemon is not None:
            stop_daemon(rig.daemon)
            shutil.rmtree(rig.daemon.home.root, ignore_errors=True)
        if refused is not None:
            refused.kill()
            refused.wait()
        if outsider is not None:
            shutil.rmtree(outsider.root, ignore_errors=True)
        rig.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_actors_run_where_the_config_places_them(rig):
    status = rig.status()
    assert status["ray_started_here"] is False and status["ray_address"] == rig.address
    assert status["ray_namespace"] == "mirador"
    where = {a["name"]: rig.node_of(a["node_id"]) for a in status["actors"]}
    assert where["stage:quick"] == "head"  # no placement: the daemon's own node
    assert where["stage:deep"] in ("gpu-a", "gpu-b")  # the nodes with gpu_box
    assert where["stage:synthesis"] == "store" and where["stage:ollama"] == "store"  # by label
    assert rig.node_of(status["memory"]["node_id"]) == "store"
    for actor in status["actors"]:
        assert actor["node_ip"] and actor["hostname"] == socket.gethostname()
    text = rig.daemon.home.mirador("status")
    assert text.returncode == 0 and "(joined)" in text.stdout
    deep = next(a for a in status["actors"] if a["name"] == "stage:deep")
    assert f"node {deep['node_id'][:12]}" in text.stdout and deep["node_ip"] in text.stdout

    events = rig.ask(COMPLEX, stages=["quick", "deep", "synthesis"], max_tokens=8)
    assert {e["stage"] for e in events if e["event"] == "token"} == {"quick", "deep", "synthesis"}, events
    assert not [e for e in events if e["event"] == "error"]


def test_an_ollama_stage_talks_to_the_ollama_of_its_node(rig):
    # OLLAMA_HOST is set for the cluster's nodes only: the host was resolved inside the actor.
    ollama = rig.actor("stage:ollama")
    assert ollama["backend"] == "ollama" and ollama["server"] == rig.ollama_host
    events = rig.ask("Say hi.", stages=["ollama"], max_tokens=4)
    (error,) = [e for e in events if e["event"] == "error"]
    assert error["code"] == "backend_unavailable" and rig.ollama_host in error["message"]
    assert events[-1]["event"] == "done"


def test_a_backend_that_goes_away_mid_answer_ends_its_stage_with_an_error(rig):
    events = rig.ask("Why is the sky blue?", stages=["flaky"], max_tokens=16)
    assert "".join(e["text"] for e in events if e["event"] == "token") == "The sky"  # what came first is kept
    (error,) = [e for e in events if e["event"] == "error"]
    assert error["code"] == "backend_unavailable" and rig.broken_ollama in error["message"]
    assert events[-1]["event"] == "done"


def test_a_backend_that_stalls_is_stopped_and_frees_the_model(rig):
    events = rig.ask("Why is the sky blue?", stages=["stalled"], max_tokens=16)
    (error,) = [e for e in events if e["event"] == "error"]
    assert error["code"] == "timeout" and events[-1]["event"] == "done"
    # The stalled request was interrupted in the actor, so the model's turn is free again (a
    # polite cancel would wait for a next token that never comes).
    deadline = time.monotonic() + 5
    while rig.actor("stage:stalled")["busy"]:
        assert time.monotonic() < deadline, "the stalled generation still holds the model"
        time.sleep(0.1)


def test_a_killed_stage_actor_restarts_and_the_next_question_succeeds(rig):
    before = rig.actor("stage:quick")
    # Named, so another driver of the cluster finds it: ray.kill(ray.get_actor(...), no_restart=False).
    rig.command(op="kill", name="stage:quick", namespace="mirador")
    deadline = time.monotonic() + 30
    while psutil.pid_exists(before["pid"]):  # same machine: wait until the crash has happened
        assert time.monotonic() < deadline, "the killed actor's process is still there"
        time.sleep(0.05)

    events = rig.ask("Name a colour.", stages=["quick"], max_tokens=6)
    assert not [e for e in events if e["event"] == "error"], events
    assert sum(e["event"] == "token" for e in events) > 0
    after = rig.actor("stage:quick")
    assert after["pid"] != before["pid"] and after["loaded"] is True  # a new process, model reloaded


def test_a_node_leaving_mid_answer_ends_that_stage_and_its_actor_moves(rig):
    first = rig.node_of(rig.actor("stage:deep")["node_id"])
    other = "gpu-b" if first == "gpu-a" else "gpu-a"
    with rig.daemon.home.client(idle_timeout=60) as client:
        events = client.ask(LONG, stages=["deep"], max_tokens=1500, memory=False)
        seen = []
        for event in events:
            seen.append(event)
            if event["event"] == "token":
                break
        rig.remove_node(first)
        removed = time.monotonic()
        seen += list(events)  # the answer ends: an error for the stage, then done
    errors = [e for e in seen if e["event"] == "error"]
    assert [(e["stage"], e["code"]) for e in errors] == [("deep", "stage_unavailable")]
    assert seen[-1]["event"] == "done"
    # Generous: Ray notices within a few seconds here; a hung client would wait its 60 s.
    assert time.monotonic() - removed < 30

    # The next question is answered by the actor, restarted on the other node with gpu_box.
    events = rig.ask("Name a planet.", stages=["deep"], max_tokens=6)
    assert not [e for e in events if e["event"] == "error"], events
    assert sum(e["event"] == "token" for e in events) > 0
    assert rig.node_of(rig.actor("stage:deep")["node_id"]) == other


def test_a_stage_no_node_can_hold_is_skipped_until_one_joins(rig):
    for role in [r for r in ("gpu-a", "gpu-b") if r in rig.nodes]:
        rig.remove_node(role)
    events = rig.ask(COMPLEX, stages=["quick", "deep"], max_tokens=6)
    (error,) = [e for e in events if e["event"] == "error"]
    assert error["stage"] == "deep" and error["code"] == "stage_unavailable"
    assert "gpu_box" in error["message"] and "not running" in error["message"]
    assert any(e["event"] == "token" and e["stage"] == "quick" for e in events)  # the rest still answers
    assert events[-1]["event"] == "done"
    assert "gpu_box" in rig.actor("stage:deep")["error"]

    rig.add_node("gpu-c", num_cpus=1, resources={"gpu_box": 1})
    deadline = time.monotonic() + 60
    while True:  # Ray places the waiting actor on the new node; the stage answers again
        events = rig.ask("Name a star.", stages=["deep"], max_tokens=6)
        if any(e["event"] == "token" for e in events):
            break
        assert time.monotonic() < deadline, events
    assert rig.node_of(rig.actor("stage:deep")["node_id"]) == "gpu-c"


def test_a_daemon_without_the_clusters_token_is_refused_and_says_what_to_do(rig):
    proc, log = rig.refused
    assert proc.wait(timeout=120) == 1
    stderr = log.read_text()
    assert "requires token authentication" in stderr and "RAY_AUTH_MODE=token" in stderr
    assert "~/.ray/auth_token" in stderr and "Traceback" not in stderr


def test_placement_is_checked():
    def config(text):
        home = make_home({"mirador.toml": text})
        try:
            return load_config(home.paths, env={})
        finally:
            shutil.rmtree(home.root, ignore_errors=True)

    deep = config('[stages.deep]\nplacement = {resources = {gpu_box = 0.001}, labels = {zone = "!cold"}}\n').stages["deep"]
    assert deep.placement == Placement(resources={"gpu_box": 0.001}, labels={"zone": "!cold"})
    assert config("").stages["quick"].placement.local
    for bad, says in [
        ('[stages.deep]\nplacement = {node = "x"}', r"stages\.deep\.placement\.node: unknown key"),
        ('[stages.deep]\nplacement = {resources = {gpu_box = 0}}', "gpu_box must be a number > 0"),
        ('[stages.deep]\nplacement = {resources = {gpu_box = 1.5}}', "whole number"),
        ('[stages.deep]\nplacement = {resources = {CPU = 1}}', "one of Ray's own resources"),
        ('[stages.deep]\nplacement = {labels = {zone = 3}}', "must be a string"),
        ('[memory]\nplacement = "gpu"', "memory.placement: must be a table"),
        ('[ray]\nactor_wait_s = 0', "ray.actor_wait_s"),
    ]:
        with pytest.raises(ConfigError, match=says):
            config(bad)
    # Ray checks the label syntax itself; the error names the config key.
    with pytest.raises(ConfigError, match=r"stages\.deep\.placement: .*Invalid label"):
        create(StageActor, "stage:deep", Placement(labels={"bad key!": "x"}), "mirador", "stages.deep.placement", "deep", [], 0.5)
