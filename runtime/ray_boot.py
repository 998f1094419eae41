"""Starting a private local Ray for the daemon, or joining an existing cluster.

A private Ray belongs to the daemon's user alone:

* it listens on loopback only: ``_node_ip_address="127.0.0.1"``, and Ray told to run as it does
  on macOS and Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), without which it replaces
  127.0.0.1 by the address other machines reach. Its GCS, raylet, object manager, workers and
  agents then bind 127.0.0.1, where before they listened on every interface;
* it requires a token (``RAY_AUTH_MODE=token``) that the daemon makes fresh at each start, in a
  0600 file in Mirador's 0700 state dir (``RAY_AUTH_TOKEN_PATH``: ``ray-<hash>.token``, removed
  at shutdown); the user's ``~/.ray`` is never read or written;
* its temp dir (sessions, logs, unix sockets) is ``/tmp/mirador-$UID/ray-<hash>``, 0700, inside
  a 0700 directory checked to be the user's; short, because Ray's unix sockets live under it.
  Ray itself makes the dir it is given and its session dirs 0777 (for machines shared by
  several users), again at each worker start: so it is given ``ray-<hash>/r``, and the two
  0700 dirs above keep other users out.
  The daemon removes it at shutdown, and removes those of dead daemons at start: each is
  claimed by a lock file next to it (``ray-<hash>.lock``), flock-ed by its daemon for life, so
  a lock that can be taken means its daemon is gone, however it ended.

Joining assumes nothing about the cluster beyond its address: it may have been started by
``ray start --head`` (with any temp dir), by ``ray.cluster_utils.Cluster``, or by another tool;
the daemon only connects a driver to it and disconnects on shutdown, leaving the cluster up.
Clusters with token authentication need the same token in the daemon's environment, as Ray
reads it: ``RAY_AUTH_MODE=token`` and the token in ``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH``
or ``RAY_AUTH_TOKEN`` (with an explicit address Ray does not turn token mode on by itself).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mirador.client import ownership
from mirador.client.paths import Paths

log = logging.getLogger("mirador.ray")

LOOPBACK = "127.0.0.1"
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # read by ray._private.ray_constants at import
_TEMP_NAME = re.compile(r"ray-[0-9a-f]{10}")
RAY_SUBDIR = "r"  # the dir Ray itself is given, inside the temp dir (short: unix socket paths)


class ClusterJoinError(Exception):
    """The daemon could not join the Ray cluster; the message says why and what to do."""


def ray_parent_dir() -> Path:
    """Where private Rays keep their temp dirs: one 0700 directory per user, short on purpose."""
    return Path(f"/tmp/mirador-{os.geteuid()}")


def _name(paths: Paths) -> str:
    """``ray-<hash>``: one per daemon (per runtime dir), stable, so that a crashed one's files are found again."""
    return f"ray-{hashlib.sha1(str(paths.runtime).encode()).hexdigest()[:10]}"


def ray_temp_dir(paths: Paths) -> Path:
    return ray_parent_dir() / _name(paths)


def token_path(paths: Paths) -> Path:
    return paths.state / f"{_name(paths)}.token"


def _lock(path: Path, blocking: bool) -> IO[bytes] | None:
    """flock ``path`` (created 0600 if missing); None if another process holds it and not ``blocking``.

    A lock file may be unlinked by whoever holds it (to clean up): after locking, make sure the
    path still names the file we locked, else lock the new one."""
    while True:
        handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "rb+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return None
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def _remove_tree(path: Path) -> None:
    """Remove a Ray temp dir; Ray's last processes may still be writing their logs: retry briefly."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.1)
    log.warning("could not remove all of %s", path)


def remove_stale_temp_dirs(parent: Path) -> list[Path]:
    """Remove the Ray temp dirs (and lock files) under ``parent`` whose daemon is gone; returns them."""
    removed = []
    names = {entry.name.removesuffix(".lock") for entry in parent.iterdir()}
    for name in sorted(n for n in names if _TEMP_NAME.fullmatch(n)):
        lock_path = parent / f"{name}.lock"
        lock = _lock(lock_path, blocking=False)
        if lock is None:  # its daemon is alive
            continue
        try:
            if os.path.lexists(parent / name):
                _remove_tree(parent / name)
                removed.append(parent / name)
            lock_path.unlink(missing_ok=True)  # while locked: see _lock
        finally:
            lock.close()
    return removed


@dataclass
class PrivateRay:
    """A private Ray's files, made ready before it starts: its temp dir, claimed by its lock for
    the daemon's lifetime, and its token."""

    temp: Path
    lock: IO[bytes]
    token: Path

    @property
    def ray_dir(self) -> Path:
        """What Ray is given as its temp dir (and makes 0777): inside our 0700 one."""
        return self.temp / RAY_SUBDIR

    @classmethod
    def prepare(cls, paths: Paths, log_max_bytes: int = 0, log_backups: int = 0) -> "PrivateRay":
        """Claim the temp dir, write a fresh token, and name both in the environment, which every
        process of the private Ray inherits. ``log_max_bytes`` / ``log_backups`` bound each of Ray's
        log files. Call it before anything imports Ray: Ray reads its environment at import."""
        if "ray" in sys.modules:
            raise RuntimeError("PrivateRay.prepare() must run before ray is imported (Ray reads its environment once)")
        parent = ray_parent_dir()
        ownership.private_dir(parent, "the directory of Mirador's private Ray")
        for stale in remove_stale_temp_dirs(parent):
            log.info("removed %s, left by a daemon that is gone", stale)
        temp = ray_temp_dir(paths)
        lock = _lock(temp.with_name(temp.name + ".lock"), blocking=True)  # ours alone: we hold the runtime dir's pid lock
        assert lock is not None
        try:
            if os.path.lexists(temp):  # left by this daemon's last run; its ray_current_cluster would hang init
                _remove_tree(temp)
            temp.mkdir(mode=0o700)
            (temp / RAY_SUBDIR).mkdir(mode=0o700)
            token = write_token(paths)
        except BaseException:
            lock.close()
            raise
        # A token the user's environment names is for their own clusters, not this one.
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(temp / RAY_SUBDIR))
        # Ray turns _node_ip_address="127.0.0.1" into the address other machines reach, unless it
        # runs as on macOS and Windows, where a local Ray is loopback-only: make it so here.
        os.environ[LOOPBACK_ONLY_ENV] = "0"
        if log_max_bytes:
            os.environ.update(RAY_ROTATION_MAX_BYTES=str(log_max_bytes), RAY_ROTATION_BACKUP_COUNT=str(log_backups))
        return cls(temp, lock, token)

    def remove(self) -> None:
        """Remove the temp dir and the token (after Ray has stopped), then let go of the claim."""
        if self.lock.closed:
            return
        _remove_tree(self.temp)
        self.token.unlink(missing_ok=True)
        self.temp.with_name(self.temp.name + ".lock").unlink(missing_ok=True)  # while locked: see _lock
        self.lock.close()


def write_token(paths: Paths) -> Path:
    """A fresh token for the private Ray, in a 0600 file in the 0700 state dir; returns its path."""
    ownership.private_dir(paths.state, "Mirador's state directory")
    path = token_path(paths)
    path.unlink(missing_ok=True)  # created anew below, 0600 from the first byte
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(secrets.token_hex(32))  # as Ray's own tokens: 256 bits
    return path


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


def start_ray(address: str, num_cpus: int, namespace: str = "mirador", private: PrivateRay | None = None) -> str:
    """Join the cluster at ``address``, or start the ``private`` Ray (prepared before Ray was
    imported). Returns the GCS address. ``ray.shutdown()`` stops a private Ray, or disconnects."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # local-first: no usage reports
    import ray

    common = dict(namespace=namespace, logging_level=logging.WARNING, log_to_driver=False)
    if address:
        log.info("joining the Ray cluster at %s", address)
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError) as exc:
            raise _join_error(address, exc) from None
    else:
        assert private is not None, "a private Ray is prepared first: PrivateRay.prepare()"
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            _temp_dir=str(private.ray_dir),
            **common,
        )
    return ray.get_runtime_context().gcs_address
