"""``mirador keys``: the CurveZMQ keys for using a daemon from another machine."""

from __future__ import annotations

import sys

import click

from . import api_keys
from . import keys as keyfiles
from .errors import MiradorError
from .paths import Paths


@click.group()
def keys() -> None:
    """Keys for remote access: CurveZMQ (`miradord --listen`, `mirador --connect`) and HTTP API keys."""


@keys.command("init")
@click.option("--force", is_flag=True, help="Replace existing keys; the old client key is removed from authorized_keys.")
def keys_init(force: bool) -> None:
    """Create the daemon's key pair and one client key pair, and authorize that client."""
    paths = Paths.from_env()
    try:
        server, client = keyfiles.init_keys(paths, force)
    except (MiradorError, OSError) as exc:
        click.echo(f"mirador: {exc}", err=True)
        sys.exit(1)
    directory = keyfiles.keys_dir(paths)
    click.echo(f"""created in {directory} (secret files mode 600):
  server.key, server.key_secret   the daemon's key pair; the secret never leaves this machine
  client.key, client.key_secret   a key pair for client machines
authorized the client key {client.public.decode()} in {keyfiles.authorized_keys_path(paths)}

On this machine, let the daemon listen on the network:
  miradord --listen tcp://0.0.0.0:7755     (or [daemon] listen = "tcp://0.0.0.0:7755" in mirador.toml)
On each client machine, copy into its Mirador config dir's keys/ folder (~/.config/mirador/keys/, mode 700):
  {directory / 'server.key'}            the daemon's public key
  {directory / 'client.key'}
  {directory / 'client.key_secret'}     keep it mode 600
then run: mirador --connect tcp://THIS-HOST:7755 status""")


@keys.command("show")
def keys_show() -> None:
    """Print the public keys and the authorized client keys (never a secret)."""
    paths = Paths.from_env()
    directory = keyfiles.keys_dir(paths)
    for name, what in ((keyfiles.SERVER, "daemon"), (keyfiles.CLIENT, "client")):
        path = directory / f"{name}.key"
        try:
            click.echo(f"{what} public key: {keyfiles.read_key(path).decode()}  ({path})")
        except MiradorError as exc:
            click.echo(f"{what} public key: none: {exc}")
    path = keyfiles.authorized_keys_path(paths)
    allowed, bad_lines = keyfiles.read_authorized(path)
    click.echo(f"authorized client keys ({len(allowed)}) in {path}:")
    for key in sorted(allowed):
        click.echo(f"  {key.decode()}")
    for line in bad_lines:
        click.echo(f"  ignored, not a key: {line}")


@keys.command("api-key")
@click.option("--note", default="", help="A note kept beside the key in the file (e.g. who uses it).")
def keys_api_key(note: str) -> None:
    """Create an API key for the HTTP API (needed by clients not on this machine)."""
    paths = Paths.from_env()
    try:
        key = api_keys.create(paths, note)
    except OSError as exc:
        click.echo(f"mirador: {exc}", err=True)
        sys.exit(1)
    click.echo(key)
    click.echo(f"""added to {api_keys.path(paths)} (mode 600; delete its line to revoke it). Clients send it as
  Authorization: Bearer {key}
e.g. OLLAMA_API_KEY=KEY for the ollama client, api_key=KEY for the openai client, or the key field
of an Open WebUI connection. With a key, the daemon may listen beyond loopback:
  miradord --http 0.0.0.0:11435    (or [http] listen = "0.0.0.0:11435" in mirador.toml)""", err=True)
