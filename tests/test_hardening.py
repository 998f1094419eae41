"""Hardening, end to end: a private Ray that only its user can reach, owner checks on every path
another user could plant, and bounded growth (log rotation, retention, Ray's temp dirs).

One real daemon for the module (real Ray, llama.cpp, ZeroMQ), started with tiny retention limits
after two other "daemons" claimed Ray temp dirs: one died (its dir must go at start), one is
alive (its dir must stay). Planting a path owned by another user needs ``chown``, so those
checks run when the tests run as root (as here); the group-writable variants run for anyone,
and one test runs the checks as an unprivileged user to show they need no root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import zmq

from mirador.client import Client, UnsafePath, keys
from mirador.client.chat import bounded_history
from mirador.runtime.metrics import SCHEMA as METRICS_SCHEMA
from mirador.runtime.ray_boot import ray_parent_dir, ray_temp_dir, token_path

from .conftest import BIN, make_home, start_daemon, stop_daemon

ROOT = os.geteuid() == 0
OTHER_UID = 12345  # a user that does not exist here: "another user"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
LOG_MAX_BYTES = int(0.0003 * 1024 * 1024)  # log_max_mb below

CONFIG = """
[retention]
log_max_mb = 0.0003     # 314 bytes: the start-up lines alone rotate it several times
log_backups = 2
metrics_days = 30
metrics_max_rows = 3
learning_days = 30
learning_max_rows = 3
prune_every_s = 1
"""

# Claims a private Ray temp dir exactly as a daemon does (PrivateRay.prepare, before Ray is
# imported), then waits to be killed.
CLAIM = """
import sys, time
from mirador.client.paths import Paths
from mirador.runtime.ray_boot import PrivateRay
private = PrivateRay.prepare(Paths.from_env())
(private.ray_dir / "session_2026-01-01_00-00-00_000000_1").mkdir()
print(private.temp, flush=True)
time.sleep(3600)
"""

mode = lambda path: stat.S_IMODE(os.stat(path).st_mode)  # noqa: E731


def claim_temp_dir() -> tuple[subprocess.Popen[str], Path, Path]:
    """A process holding a private Ray claim in a home of its own: (process, its temp dir, its home)."""
    h = make_home()
    h.paths.ensure()
    proc = subprocess.Popen([sys.executable, "-c", CLAIM], env=h.env, stdout=subprocess.PIPE, text=True)
    temp = Path(proc.stdout.readline().strip())
    assert temp.is_dir(), "the claiming process did not start"
    return proc, temp, h.root


def seed_old_rows(paths, days_old: float = 100, n: int = 5) -> None:
    """Metrics and learner rows from long ago, as a daemon of last season left them."""
    from mirador.actors.learner import SCHEMA as LEARNER_SCHEMA

    old = time.time() - days_old * 86400
    with sqlite3.connect(paths.data / "metrics.sqlite3") as conn:
        conn.executescript(METRICS_SCHEMA)
        conn.executemany("INSERT INTO queries VALUES (?, ?, 'simple', 'stages', '[\"quick\"]', 1.0, 0, '[]')",
                         [(f"old-{i}", old + i) for i in range(n)])
        conn.executemany("INSERT INTO stage_runs VALUES (?, 'quick', 'smollm2-135m', 0.1, 5, 50, 0.2, 0)",
                         [(f"old-{i}",) for i in range(n)])
    with sqlite3.connect(paths.data / "learning.sqlite3") as conn:
        conn.executescript(LEARNER_SCHEMA)
        conn.executemany("INSERT INTO observations VALUES (?, 'simple/general', 'quick', ?)",
                         [(f"old-{i}", old + i) for i in range(n)])
        conn.executemany("INSERT INTO ratings VALUES (?, 'simple/general', 'quick', 4, ?)",
                         [(f"old-{i}", old + i) for i in range(n)])


def count(db: Path, table: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def daemon_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.fixture(scope="module")
def claims():
    """A dead daemon's claim (killed: its dir is stale) and a live one's, made before the daemon starts."""
    live, live_dir, live_home = claim_temp_dir()
    dead, dead_dir, dead_home = claim_temp_dir()  # after the live one: a claim cleans up stale ones too
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert dead_dir.is_dir()
    yield dead_dir, live_dir
    live.kill()
    live.wait()
    for path in (live_dir, live_dir.with_name(live_dir.name + ".lock")):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    shutil.rmtree(dead_home, ignore_errors=True)
    shutil.rmtree(live_home, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(claims):
    h = make_home({"mirador.toml": CONFIG})
    h.env["HOME"] = str(h.root / "home")  # where Ray would put ~/.ray: it must not
    h.paths.ensure()
    seed_old_rows(h.paths)
    d = start_daemon(h)
    d.pid = int(h.paths.pidfile.read_text())
    yield d
    stop_daemon(d)
    shutil.rmtree(h.root, ignore_errors=True)


# -- the private Ray ----------------------------------------------------------------------

def test_private_ray_listens_on_loopback_only(daemon):
    tree = daemon_tree(daemon.pid)
    names = {p.name() for p in tree}
    assert {"raylet", "gcs_server"} <= names, names  # the whole private Ray is in the daemon's tree
    pids = {p.pid for p in tree}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 3  # GCS, raylet, workers...
    outside = [(c.laddr, psutil.Process(c.pid).name()) for c in listening if c.laddr.ip not in LOOPBACK]
    assert not outside, f"listening beyond loopback: {outside}"
    # From this machine's other addresses (what another machine would reach), every port is shut.
    addresses = [a.address for nic in psutil.net_if_addrs().values() for a in nic
                 if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in addresses:
        for port in {c.laddr.port for c in listening}:
            with socket.socket() as probe:
                probe.settimeout(2)
                assert probe.connect_ex((address, port)) != 0, f"{address}:{port} accepted a connection"
    if shutil.which("ss"):  # the same, as `ss -ltnp` shows it
        lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
        ours = [line for line in lines if any(f"pid={pid}," in line for pid in pids)]
        assert ours and all(line.split()[3].rsplit(":", 1)[0] in {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}
                            for line in ours), ours


def test_ray_token_is_the_daemons_own_and_owner_only(daemon):
    paths = daemon.home.paths
    token = token_path(paths)
    assert mode(token) == 0o600 and mode(paths.state) == 0o700
    assert os.stat(token).st_uid == os.geteuid() and len(token.read_text()) == 64
    # The private Ray's processes got it from the daemon (whose own /proc environ is its start-up one).
    for name in ("raylet", "gcs_server"):
        environ = next(p for p in daemon_tree(daemon.pid) if p.name() == name).environ()
        assert environ["RAY_AUTH_MODE"] == "token" and environ["RAY_AUTH_TOKEN_PATH"] == str(token), name
        assert "RAY_AUTH_TOKEN" not in environ
        # Ray's own logs rotate by [retention] too.
        assert (environ["RAY_ROTATION_MAX_BYTES"], environ["RAY_ROTATION_BACKUP_COUNT"]) == (str(LOG_MAX_BYTES), "2")
    assert not (Path(daemon.home.env["HOME"]) / ".ray").exists()  # the user's ~/.ray is left alone


def test_ray_temp_dir_is_reachable_by_its_user_only(daemon, claims):
    paths = daemon.home.paths
    temp, parent = ray_temp_dir(paths), ray_parent_dir()
    assert temp.parent == parent and len(str(temp)) < 40  # short: Ray's unix sockets live under it
    for directory in (parent, temp):
        assert mode(directory) == 0o700 and os.stat(directory).st_uid == os.geteuid(), directory
    raylet = next(p for p in daemon_tree(daemon.pid) if p.name() == "raylet")
    ray_dir = Path(raylet.environ()["RAY_TMPDIR"])
    assert ray_dir.parent == temp and any(ray_dir.glob("session_*/sockets"))
    # Ray makes the dir it is given 0777, again at each worker start: ours around it keep everyone else out.
    if ROOT and shutil.which("setpriv"):
        outsider = subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                                   "ls", str(temp)], capture_output=True, text=True)
        assert outsider.returncode != 0 and "Permission denied" in outsider.stderr


def test_stale_temp_dir_of_a_dead_daemon_is_removed_at_start_and_a_live_one_kept(daemon, claims):
    dead_dir, live_dir = claims
    assert not dead_dir.exists() and not dead_dir.with_name(dead_dir.name + ".lock").exists()
    assert live_dir.is_dir() and any(live_dir.glob("r/session_*"))
    # Said at start (the rotated log has moved on: its copy on stderr, kept until ready, has it).
    assert f"removed {dead_dir}, left by a daemon that is gone" in (daemon.home.root / "daemon.stderr").read_text()


# -- bounded growth -------------------------------------------------------------------------

def test_log_rotates_and_keeps_only_the_configured_backups(daemon):
    state = daemon.home.paths.state
    logs = sorted(p.name for p in state.glob("miradord.log*"))
    assert logs == ["miradord.log", "miradord.log.1", "miradord.log.2"], logs
    for name in logs:
        assert (state / name).stat().st_size <= LOG_MAX_BYTES + 200, name  # a file ends with the line that crossed


def test_metrics_and_learner_keep_within_their_retention(daemon):
    data = daemon.home.paths.data
    # At start: last season's rows (older than 30 days) are gone.
    for db, table in (("metrics", "queries"), ("metrics", "stage_runs"), ("learning", "observations"), ("learning", "ratings")):
        with sqlite3.connect(f"file:{data / db}.sqlite3?mode=ro", uri=True) as conn:
            assert conn.execute(f"SELECT COUNT(*) FROM {table} WHERE query_id LIKE 'old-%'").fetchone()[0] == 0, table
    with daemon.home.client(idle_timeout=120) as client:
        for i in range(5):
            events = list(client.ask(f"Say the number {i}.", stages=["quick"], max_tokens=4))
            assert any(e["event"] == "done" for e in events)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # pruned every second, off the question path
        sizes = [count(data / "metrics.sqlite3", "queries"), count(data / "learning.sqlite3", "observations")]
        if max(sizes) <= 3:
            break
        time.sleep(0.5)
    assert sizes[0] == 3 and 1 <= sizes[1] <= 3, sizes
    assert count(data / "learning.sqlite3", "ratings") == 0  # the old ratings went at start
    runs = sqlite3.connect(data / "metrics.sqlite3").execute(
        "SELECT COUNT(*) FROM stage_runs WHERE query_id NOT IN (SELECT query_id FROM queries)").fetchone()[0]
    assert runs == 0  # a dropped question's stage runs go with it
    # Once ready, the log stopped going to stderr too (a plain file here, as with `mirador daemon start`).
    stderr = (daemon.home.root / "daemon.stderr").read_text()
    after = stderr.split("further log lines go to the log file only", 1)[1]
    assert " INFO mirador." not in after and " ERROR mirador." not in after, after[-500:]


def test_chat_line_history_is_bounded():
    history = bounded_history(limit=3)
    for i in range(10):
        history.append_string(f"question {i}")
    assert history.get_strings() == ["question 7", "question 8", "question 9"]


def test_retention_config_defaults_overrides_and_bad_values():
    from mirador.runtime.config import ConfigError, load_config

    h = make_home()
    try:
        retention = load_config(h.paths, env={}).retention
        assert (retention.log_max_mb, retention.log_backups, retention.metrics_days) == (10, 3, 90)
        assert retention.log_max_bytes == 10 * 1024 * 1024
        env = {"MIRADOR_RETENTION__METRICS_MAX_ROWS": "500", "MIRADOR_RETENTION__LOG_MAX_MB": "0"}
        retention = load_config(h.paths, env=env).retention
        assert retention.metrics_max_rows == 500 and retention.log_max_bytes == 0  # 0: never rotate
        with pytest.raises(ConfigError, match="retention.learning_days: must be greater than or equal to 0"):
            load_config(h.paths, env={"MIRADOR_RETENTION__LEARNING_DAYS": "-1"})
        with pytest.raises(ConfigError, match="retention"):
            load_config(h.paths, env={"MIRADOR_RETENTION__PRUNE_EVERY_S": "0"})
    finally:
        shutil.rmtree(h.root, ignore_errors=True)


# -- owner checks ---------------------------------------------------------------------------

def planted_home(how: str):
    """A home whose runtime dir another user could have planted: ``owner`` (owned by OTHER_UID) or
    ``group`` (ours, group-writable)."""
    h = make_home()
    h.paths.runtime.mkdir(parents=True, mode=0o700)
    if how == "owner":
        os.chown(h.paths.runtime, OTHER_UID, OTHER_UID)
    else:
        os.chmod(h.paths.runtime, 0o770)
    return h


HOW = [pytest.param("owner", marks=pytest.mark.skipif(not ROOT, reason="chown to another uid needs root")), "group"]
EXPECTED = {"owner": f"belongs to uid {OTHER_UID}", "group": "can be written by other users"}


@pytest.mark.parametrize("how", HOW)
def test_daemon_refuses_a_planted_runtime_dir(how):
    h = planted_home(how)
    try:
        result = subprocess.run([str(BIN / "miradord")], env=h.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert EXPECTED[how] in result.stderr and str(h.paths.runtime) in result.stderr
        assert not h.paths.pidfile.exists()  # it wrote nothing there
    finally:
        shutil.rmtree(h.root, ignore_errors=True)


@pytest.mark.parametrize("how", HOW)
def test_client_refuses_a_socket_in_a_planted_runtime_dir(how):
    """Someone else's "daemon" listens where ours would: the client must not send it a word."""
    h = planted_home(how)
    ctx = zmq.Context.instance()
    impostor = ctx.socket(zmq.ROUTER)
    impostor.linger = 0
    try:
        impostor.bind(h.paths.endpoint)
        if how == "owner":
            os.chown(h.paths.socket, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafePath, match=EXPECTED[how]):
            Client(h.paths.endpoint)
        status = h.mirador("status", timeout=60)
        assert status.returncode != 0 and EXPECTED[how] in status.stderr, status.stderr
        asked = h.mirador("ask", "hello", timeout=60)
        assert asked.returncode != 0 and EXPECTED[how] in asked.stderr, asked.stderr
        assert impostor.poll(500) == 0  # nothing reached it
    finally:
        impostor.close()
        shutil.rmtree(h.root, ignore_errors=True)


@pytest.mark.skipif(not ROOT, reason="chown to another uid needs root")
def test_client_refuses_a_socket_another_user_owns_in_our_dir():
    h = make_home()
    h.paths.ensure()
    impostor = zmq.Context.instance().socket(zmq.ROUTER)
    impostor.linger = 0
    try:
        impostor.bind(h.paths.endpoint)
        os.chown(h.paths.socket, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafePath, match=f"socket .* belongs to uid {OTHER_UID}"):
            Client(h.paths.endpoint)
    finally:
        impostor.close()
        shutil.rmtree(h.root, ignore_errors=True)


def test_key_files_are_owner_only():
    h = make_home()
    try:
        assert h.mirador("keys", "init").returncode == 0
        directory = keys.keys_dir(h.paths)
        assert mode(directory) == 0o700
        for path in [*directory.iterdir(), keys.authorized_keys_path(h.paths)]:
            assert mode(path) == 0o600, path
    finally:
        shutil.rmtree(h.root, ignore_errors=True)


@pytest.mark.parametrize("how", HOW)
def test_planted_key_files_are_refused(how):
    h = make_home()
    try:
        assert h.mirador("keys", "init").returncode == 0
        authorized = keys.authorized_keys_path(h.paths)
        secret = keys.keys_dir(h.paths) / "server.key_secret"
        for path in (authorized, secret):
            os.chown(path, OTHER_UID, OTHER_UID) if how == "owner" else os.chmod(path, 0o620)
        with pytest.raises(UnsafePath, match=EXPECTED[how]):
            keys.read_authorized(authorized)
        with pytest.raises(UnsafePath, match=EXPECTED[how]):
            keys.load_pair(h.paths, keys.SERVER)
        # A daemon asked to listen says so at start, before Ray.
        result = subprocess.run([str(BIN / "miradord"), "--listen", "tcp://127.0.0.1:9"], env=h.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and EXPECTED[how] in result.stderr, result.stderr
    finally:
        shutil.rmtree(h.root, ignore_errors=True)


def test_private_dirs_are_made_owner_only_and_planted_links_refused(tmp_path):
    from mirador.client import ownership

    old = tmp_path / "state"
    old.mkdir(mode=0o755)  # as an earlier Mirador made it: ours, readable by others
    ownership.private_dir(old, "state dir")
    assert mode(old) == 0o700
    fresh = tmp_path / "a" / "data"
    ownership.private_dir(fresh, "data dir")
    assert mode(fresh) == 0o700
    if ROOT:  # a link another user made, pointing at a dir of ours, is refused all the same
        link = tmp_path / "run"
        link.symlink_to(old)
        os.lchown(link, OTHER_UID, OTHER_UID)
        with pytest.raises(UnsafePath, match=f"symbolic link made by uid {OTHER_UID}"):
            ownership.private_dir(link, "runtime dir")


def test_secret_key_readable_by_group_is_refused(tmp_path):
    path = tmp_path / "client.key_secret"
    path.write_text(zmq.curve_keypair()[1].decode() + "\n")
    path.chmod(0o640)
    with pytest.raises(UnsafePath, match="chmod 600"):
        keys.read_key(path)


NON_ROOT_CHECK = """
import os, sys
from pathlib import Path
from mirador.client import ownership, UnsafePath
mine, roots = Path(sys.argv[1]), Path(sys.argv[2])
ownership.private_dir(mine / "run", "runtime dir")          # made by this user: accepted, 0700
assert oct(os.stat(mine / "run").st_mode & 0o777) == "0o700"
try:
    ownership.trusted_dir(roots, "config dir")                # root's: refused
except UnsafePath as exc:
    print("refused:", exc)
os.chmod(mine / "run", 0o770)
try:
    ownership.private_dir(mine / "run", "runtime dir")      # group-writable: refused
except UnsafePath as exc:
    print("refused:", exc)
"""


@pytest.mark.skipif(not ROOT or not shutil.which("setpriv"), reason="needs root to switch to an unprivileged user")
def test_owner_checks_hold_for_an_unprivileged_user():
    base = Path(tempfile.mkdtemp(prefix="mrd-np-", dir="/tmp"))
    try:
        base.chmod(0o755)  # reachable by the unprivileged user (pytest's own tmp dirs are not)
        mine, roots = base / "mine", base / "roots"
        mine.mkdir()
        roots.mkdir(mode=0o755)
        os.chown(mine, OTHER_UID, OTHER_UID)
        result = subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                                 sys.executable, "-c", NON_ROOT_CHECK, str(mine), str(roots)],
                                capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(mine)})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    refusals = result.stdout.splitlines()
    assert len(refusals) == 2, result.stdout
    assert "belongs to root (uid 0)" in refusals[0] and f"not to you (uid {OTHER_UID})" in refusals[0]
    assert "can be written by other users" in refusals[1]


# -- last: stopping removes what the private Ray left ------------------------------------------

def test_daemon_stop_removes_the_temp_dir_and_the_token(daemon):
    paths = daemon.home.paths
    temp = ray_temp_dir(paths)
    assert temp.is_dir() and token_path(paths).exists()
    stopped = daemon.home.mirador("daemon", "stop", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert daemon.proc.wait(timeout=60) == 0
    assert not temp.exists() and not temp.with_name(temp.name + ".lock").exists()
    assert not token_path(paths).exists()
    assert ray_parent_dir().is_dir() and mode(ray_parent_dir()) == 0o700

