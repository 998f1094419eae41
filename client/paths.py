"""Where Mirador keeps things: every path derives from the XDG base directories or MIRADOR_HOME.

Setting ``MIRADOR_HOME`` puts everything (runtime, config, data, state) under one directory;
otherwise each kind follows its XDG variable. A test, or a second daemon, isolates all of its
state by setting these variables. Lives in the client package because the client must find the
daemon's socket without importing anything heavy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import ownership

APP = "mirador"
SOCKET_NAME = "miradord.sock"
PID_NAME = "miradord.pid"
LOG_NAME = "miradord.log"
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107


@dataclass(frozen=True)
class Paths:
    """The four directories Mirador uses, resolved from the environment."""

    runtime: Path  # socket and pid file: per login session, 0700
    config: Path  # user overrides of config/*.toml
    data: Path  # memories, metrics
    state: Path  # logs

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Paths":
        env = os.environ if env is None else env
        home = env.get("MIRADOR_HOME")
        if home:
            root = Path(home).expanduser()
            return cls(root / "run", root / "config", root / "data", root / "state")
        user_home = Path(env.get("HOME") or Path.home())

        def xdg(var: str, default: Path) -> Path:
            value = env.get(var)
            # The XDG spec says relative paths are invalid and must be ignored.
            return Path(value) if value and os.path.isabs(value) else default

        runtime_dir = env.get("XDG_RUNTIME_DIR")
        return cls(
            # Without XDG_RUNTIME_DIR (no systemd login session), a per-user dir in /tmp.
            runtime=Path(runtime_dir) / APP if runtime_dir else Path(f"/tmp/{APP}-{os.getuid()}"),
            config=xdg("XDG_CONFIG_HOME", user_home / ".config") / APP,
            data=xdg("XDG_DATA_HOME", user_home / ".local" / "share") / APP,
            state=xdg("XDG_STATE_HOME", user_home / ".local" / "state") / APP,
        )

    @property
    def socket(self) -> Path:
        return self.runtime / SOCKET_NAME

    @property
    def endpoint(self) -> str:
        """The ZeroMQ endpoint of the daemon's ipc socket."""
        return f"ipc://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.runtime / PID_NAME

    @property
    def logfile(self) -> Path:
        return self.state / LOG_NAME

    def ensure(self) -> None:
        """Create the directories, owner-only, and refuse any that another user owns or can write.

        The runtime dir holds the socket, the data dir memories, the state dir the log and Ray's
        token: all three are kept 0700. The config dir may be readable (it holds no secret: the
        keys are in their own 0700 dir) but no other user may write it."""
        if len(str(self.socket).encode()) > MAX_IPC_PATH:
            raise OSError(
                f"socket path {self.socket} is longer than {MAX_IPC_PATH} bytes (a unix socket limit); "
                "set XDG_RUNTIME_DIR or MIRADOR_HOME to a shorter directory"
            )
        self.config.mkdir(mode=0o700, parents=True, exist_ok=True)
        ownership.trusted_dir(self.config, "Mirador's config directory")
        ownership.private_dir(self.data, "Mirador's data directory")
        ownership.private_dir(self.state, "Mirador's state directory")
        ownership.private_dir(self.runtime, "Mirador's runtime directory")
