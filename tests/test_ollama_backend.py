"""The Ollama backend, through the official `ollama` client, against a loopback HTTP server.

No Ollama server can be installed on these machines, so these tests talk to
``tests/fake_ollama.py``, a server on 127.0.0.1 that replays Ollama's real NDJSON wire format,
including its error shapes.
"""

from __future__ import annotations

import asyncio
import shutil
import socket

import pytest

from mirador.actors.backend import BackendUnavailable, GenerationOptions, ModelError, UnknownModel
from mirador.actors.ollama_backend import OllamaBackend
from tests.conftest import make_home
from tests.fake_ollama import ANSWER, FakeOllama, fake_ollama


@pytest.fixture(scope="module")
def ollama_host():
    with fake_ollama() as host:
        yield host


def run(coro):
    return asyncio.run(coro)


async def collect(backend, **opts):
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    return [t async for t in backend.stream(messages, GenerationOptions(**opts))]


def test_streams_tokens_with_logprobs_and_passes_options(ollama_host):
    backend = OllamaBackend("small", "llama3.2:1b", host=ollama_host, keep_alive="10m")
    tokens = run(collect(backend, max_tokens=32, temperature=0.1))
    assert [t.text for t in tokens] == [text for text, _ in ANSWER]
    assert [t.logprob for t in tokens] == pytest.approx([lp for _, lp in ANSWER])
    path, body = FakeOllama.requests[-1]
    assert path == "/api/chat" and body["stream"] is True and body["logprobs"] is True
    assert body["keep_alive"] == "10m"
    assert body["options"]["num_predict"] == 32 and body["options"]["temperature"] == 0.1


def test_a_server_without_logprobs_gives_none(ollama_host):
    tokens = run(collect(OllamaBackend("old", "nologprobs:latest", host=ollama_host)))
    assert len(tokens) == len(ANSWER) and all(t.logprob is None for t in tokens)


def test_mid_stream_error_becomes_model_error(ollama_host):
    backend = OllamaBackend("bad", "crashes:latest", host=ollama_host)
    seen = []

    async def go():
        async for token in backend.stream([{"role": "user", "content": "hi"}], GenerationOptions()):
            seen.append(token)

    with pytest.raises(ModelError, match="unexpected EOF") as info:
        run(go())
    assert not isinstance(info.value, BackendUnavailable)
    assert [t.text for t in seen] == ["The", " sky"]  # what came before the error was delivered


def test_unknown_model_says_how_to_pull_it(ollama_host):
    with pytest.raises(UnknownModel, match=r"ollama pull missing:latest"):
        run(collect(OllamaBackend("m", "missing:latest", host=ollama_host)))
    with pytest.raises(UnknownModel):
        run(OllamaBackend("m", "missing:latest", host=ollama_host).load())


def test_load_and_unload_use_empty_messages_and_keep_alive(ollama_host):
    backend = OllamaBackend("small", "llama3.2:1b", host=ollama_host, keep_alive=-1)
    run(backend.load())
    assert FakeOllama.requests[-1][1]["messages"] == [] and FakeOllama.requests[-1][1]["keep_alive"] == -1
    assert run(backend.is_loaded()) is True
    run(backend.unload())
    assert FakeOllama.requests[-1][1]["keep_alive"] == 0
    assert run(backend.is_loaded()) is False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_is_one_clear_error(monkeypatch):
    host = f"http://127.0.0.1:{free_port()}"
    backend = OllamaBackend("small", "llama3.2:1b", host=host)
    for action in (collect(backend), backend.load()):
        with pytest.raises(BackendUnavailable) as info:
            run(action)
        assert f"Ollama is not running at {host}" in str(info.value) and "ollama serve" in str(info.value)
    assert run(backend.is_loaded()) is False
    # Without a host option the backend honours OLLAMA_HOST, like the ollama CLI.
    monkeypatch.setenv("OLLAMA_HOST", host)
    with pytest.raises(BackendUnavailable, match=host):
        run(collect(OllamaBackend("small", "llama3.2:1b")))


def pull_cli(home, name: str, host: str):
    return home.mirador("models", "pull", name, env={"OLLAMA_HOST": host})


MANIFEST = """
[models.remote-small]
backend = "ollama"
source = "llama3.2:1b"
[models.remote-missing]
backend = "ollama"
source = "missing:latest"
[models.local-gguf]
backend = "llamacpp"
source = "/nonexistent/model.gguf"
"""


@pytest.fixture
def home():
    h = make_home({"models.toml": MANIFEST})
    yield h
    shutil.rmtree(h.root, ignore_errors=True)


def test_models_pull_streams_ollama_progress_and_errors(ollama_host, home):
    pulled = pull_cli(home, "remote-small", ollama_host)
    assert pulled.returncode == 0, pulled.stderr
    assert FakeOllama.requests[-1] == ("/api/pull", {"model": "llama3.2:1b", "insecure": False, "stream": True})
    lines = pulled.stderr.splitlines()  # not a terminal: each stage once, in order
    assert lines[0] == "pulling manifest" and lines[-1] == "success" and "verifying sha256 digest" in lines
    assert pulled.stdout.strip() == "pulled remote-small"

    missing = pull_cli(home, "remote-missing", ollama_host)
    assert missing.returncode == 1 and "Ollama could not pull 'missing:latest': pull model manifest: file does not exist" in missing.stderr
    dead = pull_cli(home, "remote-small", f"http://127.0.0.1:{free_port()}")
    assert dead.returncode == 1 and "Ollama is not running at" in dead.stderr and "ollama serve" in dead.stderr


def test_models_pull_of_gguf_files_and_packages(home):
    shipped = home.mirador("models", "pull", "smollm2-135m")  # the default model: its package is installed
    assert shipped.returncode == 0 and "already installed: " in shipped.stderr and "SmolLM2-135M-Instruct" in shipped.stderr
    path = home.mirador("models", "pull", "local-gguf")
    assert path.returncode == 1 and "/nonexistent/model.gguf does not exist" in path.stderr and "cannot be pulled" in path.stderr
    unknown = home.mirador("models", "pull", "nope")
    assert unknown.returncode == 2 and "no model 'nope' in the manifest" in unknown.stderr
