"""The ``mirador`` command. Thin: it imports no Ray, ChromaDB or llama.cpp, so it starts fast."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import daemon_control
from .api import Client, DaemonNotRunning, MiradorError
from .paths import Paths
from .render import Renderer


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"mirador: {message}", err=True)
    sys.exit(code)


def _progress_printer(label: str):
    """A progress callback that rewrites one stderr line while the daemon starts."""
    tty = sys.stderr.isatty()
    shown = {"last": -1}

    def progress(waited: float) -> None:
        second = int(waited)
        if tty:
            click.echo(f"\r{label} {waited:4.1f} s", err=True, nl=False)
        elif second != shown["last"] and second % 10 == 0:
            click.echo(f"{label} {second} s", err=True)
        shown["last"] = second

    def finish() -> None:
        if tty and shown["last"] >= 0:
            click.echo("\r\x1b[K", err=True, nl=False)

    return progress, finish


def _start_daemon(paths: Paths, args: list[str] | None = None) -> bool:
    progress, finish = _progress_printer("waiting for miradord to start…")
    try:
        return daemon_control.ensure_running(paths, progress, args)
    except MiradorError as exc:
        finish()
        _fail(str(exc))
    finally:
        finish()
    return False


@click.group()
@click.version_option(package_name="mirador-ai", prog_name="mirador")
def main() -> None:
    """Mirador: a local-first personal AI daemon and its client."""


@main.command()
@click.argument("text", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the events as NDJSON, one object per line.")
@click.option("--stages", help="Comma-separated stages to run, e.g. quick (default: the router picks).")
@click.option("--sequential", is_flag=True, help="Run the stages one after another, each seeing the previous answers.")
@click.option("--chain", help="Run a named chain instead of stages (see `mirador chains`).")
@click.option("--max-tokens", type=click.IntRange(1, 8192), help="Limit each stage's answer length.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="Sampling temperature for every stage.")
@click.option("--no-autostart", is_flag=True, help="Fail instead of starting the daemon when none is running.")
def ask(text: tuple[str, ...], as_json: bool, stages: str | None, sequential: bool, chain: str | None,
        max_tokens: int | None, temperature: float | None, no_autostart: bool) -> None:
    """Ask a question; the answer streams as it is generated. TEXT '-' reads standard input."""
    question = sys.stdin.read() if text == ("-",) else " ".join(text)
    if not question.strip():
        _fail("the question is empty", 2)
    if chain and (stages or sequential):
        _fail("--chain runs the chain's own steps; it cannot be combined with --stages or --sequential", 2)
    paths = Paths.from_env()
    if not daemon_control.answers(paths):
        if no_autostart:
            _fail(f"no Mirador daemon is running (socket {paths.socket}); start one with `mirador daemon start`")
        click.echo(f"mirador: no daemon running; starting miradord in the background (log: {paths.logfile})", err=True)
        _start_daemon(paths)

    stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    renderer = None if as_json else Renderer(sys.stdout, sys.stderr)
    failed = False
    with Client(paths.endpoint) as client:
        events = client.ask(question, stages=stage_list, max_tokens=max_tokens, temperature=temperature,
                            sequential=sequential, chain=chain)
        try:
            for event in events:
                failed |= event.get("event") == "error"
                if renderer:
                    renderer.handle(event)
                else:
                    click.echo(json.dumps(event, ensure_ascii=False))
        except KeyboardInterrupt:
            events.close()  # tells the daemon to stop generating
            if renderer:
                renderer.stop_spinner()
            click.echo("\nmirador: cancelled", err=True)
            sys.exit(130)
        except MiradorError as exc:
            _fail(str(exc))
        finally:
            if renderer:
                renderer.stop_spinner()
    sys.exit(1 if failed else 0)


def _query(method: str) -> dict[str, Any]:
    """One status-like request to a running daemon, or a clear error."""
    paths = Paths.from_env()
    try:
        if not paths.socket.exists():
            raise DaemonNotRunning("")
        with Client(paths.endpoint) as client:
            return getattr(client, method)()
    except DaemonNotRunning:
        if daemon_control.running_pid(paths) is not None:
            _fail("miradord is starting; try again in a moment")
        _fail("miradord is not running; start it with `mirador daemon start`")
    raise AssertionError("unreachable")


def _status_text(status: dict[str, Any]) -> str:
    up = int(status["uptime_s"])
    ray_how = "started by the daemon" if status.get("ray_started_here") else "joined"
    lines = [
        f"miradord {status['version']}  pid {status['pid']}  up {up // 3600}h{up % 3600 // 60:02d}m{up % 60:02d}s"
        f"  {'ready' if status.get('ready') else 'starting'}",
        f"ray:     {status['ray_address']} ({ray_how})",
        f"socket:  {status['socket']}",
        f"log:     {status['log']}",
        "actors:",
    ]
    for actor in status["actors"]:
        state = "loaded" if actor.get("loaded") else "not loaded"
        if actor.get("busy"):
            state += ", generating"
        where = f"  node {actor['node_id'][:12]}  pid {actor['pid']}" if actor.get("node_id") else ""
        lines.append(f"  {actor['name']:<16} {actor.get('model', '?')} ({actor.get('backend', '?')})  {state}{where}")
        if actor.get("error"):
            lines.append(f"  {'':<16} error: {actor['error']}")
    return "\n".join(lines)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """Show the daemon: pid, uptime, Ray address, and each actor with its model."""
    result = _query("status")
    click.echo(json.dumps(result, indent=2) if as_json else _status_text(result))


@main.command()
def chains() -> None:
    """List the named chains (run one with `mirador ask --chain NAME`)."""
    listed = _query("status")["chains"]
    if not listed:
        click.echo("no chains configured (add [chains.NAME] to mirador.toml)")
    for chain in listed:
        click.echo(f"{chain['name']}: {chain['description']}\n  steps: {' → '.join(chain['steps'])}")


def _stats_table(rows: list[dict[str, Any]], title: str) -> list[str]:
    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    lines = [f"{title:<16} {'runs':>5} {'first p50':>10} {'first p95':>10} {'tok/s p50':>10} {'tok/s p95':>10} {'tokens':>7}"]
    for r in rows:
        lines.append(f"{str(r['name']):<16} {r['runs']:>5} {num(r['first_token_p50_s'], '9.3f')}s {num(r['first_token_p95_s'], '9.3f')}s "
                     f"{num(r['tokens_per_s_p50'], '10.1f')} {num(r['tokens_per_s_p95'], '10.1f')} {r['tokens_mean']:>7}")
    return lines


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def stats(as_json: bool) -> None:
    """Per stage and per model: first-token time and tokens/s (p50/p95) over recorded questions."""
    result = _query("stats")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    routes = ", ".join(f"{k} {v}" for k, v in sorted(result["routes"].items())) or "none"
    lines = [f"{result['queries']} questions ({routes}); {result['errors']} stage errors", ""]
    lines += _stats_table(result["stages"], "stage") + [""] + _stats_table(result["models"], "model")
    click.echo("\n".join(lines))


@main.group()
def daemon() -> None:
    """Start or stop the background daemon."""


@daemon.command("start")
@click.option("--ray-address", help="Join this Ray cluster instead of starting a private one.")
def daemon_start(ray_address: str | None) -> None:
    """Start miradord in the background and wait until it is ready."""
    paths = Paths.from_env()
    pid = daemon_control.running_pid(paths)
    if pid is not None and daemon_control.answers(paths):
        click.echo(f"miradord is already running (pid {pid})")
        return
    started = _start_daemon(paths, ["--ray-address", ray_address] if ray_address else None)
    pid = daemon_control.running_pid(paths)
    click.echo(f"miradord {'started' if started else 'is running'} (pid {pid}); log: {paths.logfile}")


@daemon.command("stop")
def daemon_stop() -> None:
    """Stop the daemon (SIGTERM) and wait until it has shut down."""
    paths = Paths.from_env()
    try:
        pid = daemon_control.stop(paths)
    except MiradorError as exc:
        _fail(str(exc))
    click.echo(f"miradord (pid {pid}) stopped" if pid else "miradord is not running")


if __name__ == "__main__":
    main()
