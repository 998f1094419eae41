"""Owner checks on the paths another local user could plant.

Mirador trusts what it finds in its directories: a socket there is the daemon, a key there is
the user's, a config there is the user's (and a config can name Python code to run). So every
directory and file that decides something is checked before use, on the daemon side and the
client side alike: it must belong to the user running Mirador, and no other user may write it;
secrets and private directories must not even be readable by others. A check that fails raises
UnsafePath saying what is wrong and what to do; nothing is silently repaired that another user
could have touched (a private directory of ours that is merely readable by others is tightened).

The rules hold for any user (``os.geteuid()``), root included: nothing here needs privileges.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from .errors import UnsafePath

WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
READABLE_BY_OTHERS = stat.S_IRWXG | stat.S_IRWXO


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _owned(path: Path, st: os.stat_result, what: str) -> None:
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafePath(f"{what} {path} belongs to {_user(st.st_uid)}, not to you ({_user(me)}): another user may "
                         f"have put it there to intercept Mirador. Remove it (or point MIRADOR_HOME / the XDG "
                         f"directories elsewhere) and try again")


def _check(path: Path, st: os.stat_result, what: str, private: bool) -> None:
    """Refuse ``path`` (already stat'ed) when it is not ours, or others may write (or, ``private``, read) it."""
    _owned(path, st, what)
    mode = stat.S_IMODE(st.st_mode)
    if mode & WRITABLE_BY_OTHERS:
        raise UnsafePath(f"{what} {path} can be written by other users (mode {mode:o}), so what Mirador finds there "
                         f"cannot be trusted; run `chmod go-w {path}` (or remove it) and try again")
    if private and mode & READABLE_BY_OTHERS:
        fix = "chmod 700" if stat.S_ISDIR(st.st_mode) else "chmod 600"
        raise UnsafePath(f"{what} {path} can be read by other users (mode {mode:o}); run `{fix} {path}`")


def _stat(path: Path, what: str) -> os.stat_result:
    """The stat of ``path`` through a symbolic link, which must be ours too (a link is how one plants a path)."""
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and link.st_uid != os.geteuid():
        raise UnsafePath(f"{what} {path} is a symbolic link made by {_user(link.st_uid)}, not by you; "
                         "remove it and try again")
    return os.stat(path)


def trusted_dir(path: Path, what: str) -> None:
    """An existing directory that is ours and that no other user can write (config dir, keys dir)."""
    st = _stat(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{what} {path} is not a directory; remove it and try again")
    _check(path, st, what, private=False)


def private_dir(path: Path, what: str) -> None:
    """Create ``path`` owner-only (0700) if missing; refuse it when another user owns or can write it.

    Ours but readable by others (an older Mirador made it 0755): tightened to 0700, since only we
    could have written in it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = _stat(path, what)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{what} {path} is not a directory; remove it and try again")
    _check(path, st, what, private=False)
    if stat.S_IMODE(st.st_mode) & READABLE_BY_OTHERS:
        os.chmod(path, 0o700)


def trusted_file(path: Path, what: str, secret: bool = False) -> None:
    """An existing file that is ours and that no other user can write (nor read, if ``secret``)."""
    _check(path, _stat(path, what), what, private=secret)


def check_daemon_socket(socket: Path) -> None:
    """Before a client talks to a local daemon: the socket's directory must be ours and unwritable by
    others, and the socket ours. Missing ones are not an error here: connecting then finds no daemon,
    which the client reports as such."""
    try:
        trusted_dir(socket.parent, "the daemon's runtime directory")
        st = _stat(socket, "the daemon's socket")
    except FileNotFoundError:
        return
    _owned(socket, st, "the daemon's socket")
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(f"the daemon's socket {socket} is not a socket; remove it and start the daemon again")
