"""Remote access end to end: a real miradord listening on loopback TCP with CurveZMQ and ZAP.

One daemon for the module, started with ``[daemon] listen`` in its config after ``mirador keys
init``; clients connect as an authorized key, an unknown key, a wrong server key and no CURVE.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import stat
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from mirador.client import AccessDenied, AsyncClient, Client, DaemonNotRunning, MiradorError, protocol
from mirador.client import keys, remote
from mirador.runtime.config import load_config

from .conftest import BIN, make_home, start_daemon, stop_daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    h = make_home({"mirador.toml": f'[daemon]\nlisten = "{endpoint}"\n'})
    init = h.mirador("keys", "init")
    assert init.returncode == 0, init.stderr
    d = start_daemon(h)
    d.endpoint = endpoint
    yield d
    stop_daemon(d)
    shutil.rmtree(h.root, ignore_errors=True)


@pytest.fixture
def outsider():
    """A second home (another machine): the daemon's public key copied in, but a key pair of its own."""
    h = make_home()
    assert h.mirador("keys", "init").returncode == 0
    yield h
    shutil.rmtree(h.root, ignore_errors=True)


def daemon_log(d) -> str:
    return d.home.paths.logfile.read_text()


def test_keys_init_writes_owner_only_secrets_and_refuses_to_overwrite():
    h = make_home()
    try:
        first = h.mirador("keys", "init")
        assert first.returncode == 0, first.stderr
        directory, authorized = keys.keys_dir(h.paths), keys.authorized_keys_path(h.paths)
        mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
        assert mode(directory) == 0o700
        assert mode(directory / "server.key_secret") == mode(directory / "client.key_secret") == 0o600
        assert mode(authorized) == 0o600
        client_key = keys.read_key(directory / "client.key")
        assert keys.read_authorized(authorized)[0] == {client_key}
        # It says where the keys are and what to copy to a client machine.
        assert str(directory) in first.stdout and "client.key_secret" in first.stdout and "--connect" in first.stdout
        # The secret halves belong to the public ones.
        for name in ("server", "client"):
            pair = keys.load_pair(h.paths, name)
            assert zmq.curve_public(pair.secret) == pair.public

        before = {p.name: p.read_text() for p in directory.iterdir()}
        again = h.mirador("keys", "init")
        assert again.returncode == 1 and "--force" in again.stderr
        assert {p.name: p.read_text() for p in directory.iterdir()} == before

        forced = h.mirador("keys", "init", "--force")
        assert forced.returncode == 0, forced.stderr
        new_key = keys.read_key(directory / "client.key")
        assert new_key != client_key
        assert keys.read_authorized(authorized)[0] == {new_key}  # the replaced key no longer gets in
        assert mode(directory / "server.key_secret") == 0o600

        shown = h.mirador("keys", "show")
        assert new_key.decode() in shown.stdout and keys.read_key(directory / "server.key").decode() in shown.stdout
        secret = keys.read_key(directory / "client.key_secret").decode()
        assert secret not in shown.stdout
    finally:
        shutil.rmtree(h.root, ignore_errors=True)


def test_secret_key_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "client.key_secret"
    path.write_text(zmq.curve_keypair()[1].decode() + "\n")
    path.chmod(0o644)
    with pytest.raises(MiradorError, match="chmod 600"):
        keys.read_key(path)


def test_authorized_client_pings_and_asks_over_tcp(daemon):
    creds = remote.credentials(daemon.home.paths)
    with Client(daemon.endpoint, idle_timeout=60, curve=creds) as client:
        assert client.ping(timeout=5)["ready"] is True
        events = list(client.ask("Say hi.", stages=["quick"], max_tokens=8, memory=False))
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert 1 <= len([e for e in events if e["event"] == "token"]) <= 8

    async def async_ping():
        async with AsyncClient(daemon.endpoint, curve=creds) as client:
            return await client.ping(timeout=5)

    assert asyncio.run(async_ping())["ready"] is True
    assert "authorized" in daemon_log(daemon)


def test_cli_on_another_machine_with_the_three_copied_key_files(daemon):
    # What `mirador keys init` tells the user to do: copy server.key and the client pair over.
    laptop = make_home()
    try:
        keys.keys_dir(laptop.paths).mkdir(parents=True, mode=0o700)
        for name in ("server.key", "client.key", "client.key_secret"):
            shutil.copy2(keys.keys_dir(daemon.home.paths) / name, keys.keys_dir(laptop.paths) / name)
        asked = laptop.mirador("--connect", daemon.endpoint, "ask", "--json", "--no-memory", "--stages", "quick",
                               "--max-tokens", "8", "Say hi.")
        assert asked.returncode == 0, asked.stderr
        events = [json.loads(line) for line in asked.stdout.splitlines()]
        assert events[0]["event"] == "start" and events[-1]["event"] == "done"
        assert not laptop.paths.socket.exists()  # no local daemon was started for it

        status = subprocess.run([str(BIN / "mirador"), "status"], env={**laptop.env, "MIRADOR_CONNECT": daemon.endpoint},
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert f"listen:  {daemon.endpoint}" in status.stdout
        (laptop.paths.config / "mirador.toml").write_text(f'[client]\nconnect = "{daemon.endpoint}"\n')
        assert "smollm2" in laptop.mirador("stats").stdout
        # `daemon stop` is about this machine's daemon: with a remote one selected it refuses.
        refused = laptop.mirador("daemon", "stop")
        assert refused.returncode == 2 and "this machine" in refused.stderr
        assert daemon.proc.poll() is None
    finally:
        shutil.rmtree(laptop.root, ignore_errors=True)


def test_unknown_client_key_is_refused_with_an_actionable_error(daemon, outsider):
    # The outsider knows the daemon's public key but its own key is not authorized.
    shutil.copy(keys.keys_dir(daemon.home.paths) / "server.key", keys.keys_dir(outsider.paths) / "server.key")
    own_key = keys.read_key(keys.keys_dir(outsider.paths) / "client.key").decode()
    started = time.monotonic()
    result = outsider.mirador("--connect", daemon.endpoint, "status", timeout=60)
    assert result.returncode == 1
    assert time.monotonic() - started < 10  # noticed from the handshake, not after a long timeout
    message = result.stderr
    assert f"the daemon at {daemon.endpoint} refused this client" in message
    assert own_key in message and "authorized_keys" in message and "mirador keys" in message
    assert "Traceback" not in message

    creds = remote.credentials(outsider.paths)
    with Client(daemon.endpoint, curve=creds) as client, pytest.raises(AccessDenied, match="refused this client"):
        client.ping(timeout=5)
    assert f"not in {keys.authorized_keys_path(daemon.home.paths)}" in daemon_log(daemon)

    # The daemon keeps serving the authorized client...
    with Client(daemon.endpoint, curve=remote.credentials(daemon.home.paths)) as client:
        assert client.ping(timeout=5)["ready"] is True
    # ...and authorized_keys is read at each handshake: adding the key lets the outsider in, no restart.
    keys.authorize(daemon.home.paths, own_key.encode())
    try:
        with Client(daemon.endpoint, curve=creds) as client:
            assert client.ping(timeout=5)["ready"] is True
    finally:
        path = keys.authorized_keys_path(daemon.home.paths)
        path.write_text("".join(line for line in path.read_text().splitlines(True) if own_key not in line))


def test_wrong_daemon_key_fails_the_handshake_and_says_which_key(daemon, outsider):
    # The outsider's keys dir holds its own server.key, not the daemon's.
    result = outsider.mirador("--connect", daemon.endpoint, "status", timeout=60)
    assert result.returncode == 1
    assert "CurveZMQ handshake" in result.stderr
    assert str(keys.keys_dir(outsider.paths) / "server.key") in result.stderr  # where the wrong key came from


def test_plain_tcp_client_without_curve_gets_nothing(daemon):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(daemon.endpoint)
        sock.send(protocol.request("ping", "plain-1"))
        assert sock.poll(2000) == 0  # no pong, nor anything else
        events = []
        while monitor.poll(0):
            events.append(parse_monitor_message(monitor.recv_multipart())["event"])
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events
        assert {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL} & set(events)
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()
    with Client(daemon.endpoint, curve=remote.credentials(daemon.home.paths)) as client:
        assert client.ping(timeout=5)["ready"] is True


def test_ipc_socket_works_as_before_without_keys(daemon):
    with daemon.home.client() as client:
        assert client.curve is None
        assert client.ping()["ready"] is True
        assert client.status()["listen"] == daemon.endpoint
    # Raw frames on the ipc socket, no CURVE options at all.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(daemon.home.paths.endpoint)
        sock.send(protocol.request("ping", "raw-1"))
        assert sock.poll(5000)
        assert msgpack.unpackb(sock.recv())["event"] == "pong"
    finally:
        sock.close()


def test_nothing_listening_is_reported_as_such(daemon):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, curve=remote.credentials(daemon.home.paths)) as client:
        with pytest.raises(DaemonNotRunning, match="nothing accepts connections"):
            client.ping(timeout=1)


def test_client_without_keys_says_what_to_copy_and_bad_endpoints_are_refused():
    h = make_home()
    try:
        missing = h.mirador("--connect", "tcp://127.0.0.1:9", "status")
        assert missing.returncode == 1
        assert "daemon's public key" in missing.stderr and str(keys.keys_dir(h.paths) / "server.key") in missing.stderr
        bad = h.mirador("--connect", "127.0.0.1:7755", "status")
        assert bad.returncode == 2 and "tcp://HOST:PORT" in bad.stderr
        # A server_key in [client] is used instead of the file.
        server_key = zmq.curve_keypair()[0].decode()
        h.paths.config.mkdir(parents=True)
        (h.paths.config / "mirador.toml").write_text(f'[client]\nserver_key = "{server_key}"\n')
        with pytest.raises(MiradorError, match="client.key"):  # still no key pair of its own
            remote.credentials(h.paths)
    finally:
        shutil.rmtree(h.root, ignore_errors=True)


def test_daemon_refuses_to_listen_without_keys_or_with_a_bad_endpoint():
    h = make_home()
    try:
        h.paths.ensure()
        for listen, expected in ((f"tcp://127.0.0.1:{free_port()}", "mirador keys init"),
                                 ("http://localhost:80", "tcp://HOST:PORT")):
            result = subprocess.run([str(BIN / "miradord"), "--listen", listen], env=h.env, capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 2, result.stderr
            assert expected in result.stderr
    finally:
        shutil.rmtree(h.root, ignore_errors=True)


def test_listen_from_config_and_environment():
    h = make_home()
    try:
        assert load_config(h.paths, env={}).listen == ""
        env = {"MIRADOR_DAEMON__LISTEN": "tcp://0.0.0.0:7755"}
        assert load_config(h.paths, env=env).listen == "tcp://0.0.0.0:7755"
    finally:
        shutil.rmtree(h.root, ignore_errors=True)


def test_client_package_stays_thin():
    code = ("import sys, mirador.client.cli; "
            "heavy = {'ray', 'chromadb', 'llama_cpp', 'mirador.runtime'} & set(sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
