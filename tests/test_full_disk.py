"""A full disk under the data dir: every failed write is reported clearly, the daemon keeps
answering, and remembering works again once there is room.

The data dir is a small tmpfs mounted for the test (the tests run as root here, and root may
mount). Where mounting is not permitted, the module is skipped: a directory made read-only
would not do, since root writes to it anyway, and without root this module cannot mount."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mirador.client import Unavailable

from .conftest import done_event, make_home, start_daemon, stop_daemon

TMPFS_SIZE = "48m"


def _mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(where)],
                             capture_output=True, text=True)
    return mounted.returncode == 0


@pytest.fixture(scope="module")
def full_disk_daemon():
    home = make_home()
    if not _mount_tmpfs(home.paths.data):
        shutil.rmtree(home.root, ignore_errors=True)
        pytest.skip("cannot mount a tmpfs here (needs root, or a container that allows mount)")
    d = start_daemon(home)
    yield d
    stop_daemon(d)
    subprocess.run(["umount", str(home.paths.data)], check=False)
    shutil.rmtree(home.root, ignore_errors=True)


def _fill(where: Path) -> Path:
    """Take every free byte of the file system that holds ``where``."""
    filler = where / "filler"
    block = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:  # the last, partial block
            while True:
                out.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def _ask(home, text, **kwargs):
    with home.client(idle_timeout=120) as client:
        return list(client.ask(text, stages=["quick"], max_tokens=8, **kwargs))


def test_a_full_disk_gives_a_clear_error_and_the_daemon_keeps_answering(full_disk_daemon, tmp_path):
    home = full_disk_daemon.home
    data = home.paths.data
    assert _ask(home, "Remember that my bike is red.")[-1]["event"] == "remembered"

    filler = _fill(data)
    try:
        assert shutil.disk_usage(data).free < 64 * 1024
        events = _ask(home, "My cat is called Miso.")
        assert any(e["event"] == "token" for e in events) and done_event(events)  # answered all the same
        last = events[-1]
        assert last["event"] == "error" and last["final"] and last["code"] == "memory_unavailable"
        assert "this exchange was not stored" in last["message"]
        assert f"the disk holding {data / 'memory'} is full" in last["message"]

        # The CLI shows the answer, then says on stderr that it was not stored.
        cli = home.mirador("ask", "--stages", "quick", "--max-tokens", "8", "My fish is called Bubbles.")
        assert cli.returncode == 1 and cli.stdout.strip()
        assert "this exchange was not stored: the disk holding" in cli.stderr and "is full" in cli.stderr
        chat = home.mirador("chat", "--max-tokens", "8", input="My hamster is called Nibbles.\nSay yes.\n")
        assert chat.returncode == 0 and chat.stderr.count("this exchange was not stored: the disk holding") == 2
        as_json = home.mirador("ask", "--json", "--stages", "quick", "--max-tokens", "4", "Say yes.")
        events = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert as_json.returncode == 1 and events[-1]["event"] == "error" and events[-1]["code"] == "memory_unavailable"

        # An import is refused as clearly, and leaves nothing behind.
        before = {r["id"] for r in json.loads(home.mirador("memory", "list", "--limit", "0", "--json").stdout)}
        records = tmp_path / "m.jsonl"
        records.write_text("".join(json.dumps({"id": f"full-{i}", "question": f"q{i}?", "answer": f"a{i}."}) + "\n"
                                   for i in range(30)))
        refused = home.mirador("memory", "import", str(records))
        assert refused.returncode == 1 and "is full" in refused.stderr and "nothing was imported" in refused.stderr
        with home.client() as client:
            with pytest.raises(Unavailable, match="is full") as raised:
                client.memory("import", records=[{"id": "full-x", "question": "q", "answer": "a"}])
            assert raised.value.code == "memory_unavailable"
            assert {r["id"] for r in client.memory("list", limit=0)["records"]} == before

        # Still answering, still recalling.
        events = _ask(home, "What colour is my bike?")
        assert any(e["event"] == "token" for e in events)
        assert [m["question"] for m in next(e for e in events if e["event"] == "memory")["recalled"]][0].startswith(
            "Remember that my bike")
    finally:
        os.unlink(filler)

    # Room again: remembering works again, without a restart.
    events = _ask(home, "My cat is called Miso.")
    assert events[-1]["event"] == "remembered"
    with home.client() as client:
        assert client.memory("show", target=events[-1]["memory_id"])["records"][0]["question"] == "My cat is called Miso."
    assert "is full" in home.paths.logfile.read_text()  # the daemon's log says it too
