"""``mirador train``: LoRA adapters for the embedded models, trained on the answers you rated well."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from .cli_jobs import _ago, _query

ENDED = ("done", "cancelled", "failed", "skipped")


def _model_option(f: Any) -> Any:
    return click.option("--model", "model", default=None, help="Which embedded model (default: the first one a stage runs).")(f)


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


@click.group(invoke_without_command=True)
@click.pass_context
def train(ctx: click.Context) -> None:
    """Background LoRA training: the embedded models adapt to the answers you rated 4 or 5.
    Without a subcommand: `mirador train status`."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(train_status)


def _print_status(status: dict[str, Any]) -> None:
    for name, m in status["models"].items():
        active = f"adapter v{m['active']}" if m["active"] else "no adapter (the base model)"
        last = f"; last run {_ago(m['last'])}: {m['last_why']}" if m["last"] else "; never trained"
        click.echo(f"{name}: {active}; {m['versions']} versions{last}")
        if m["running"]:
            job = m["running"]
            click.echo(f"  running: job {job['id']} {job['state']} {job['progress']}")
    if not status["models"]:
        click.echo("no stage runs an embedded (llama.cpp) model: nothing to train")
    if not status["enabled"]:
        click.echo("scheduled runs are off ([train] enabled = false); `mirador train run` still works")
    if status["allowed"]:
        click.echo(f"no run may work now: {status['allowed']}")


@train.command("status")
@_model_option
@_json_option
def train_status(model: str | None, as_json: bool) -> None:
    """The active adapter of each embedded model, the last run, and a run in progress."""
    status = _query("train", "status", model=model)
    click.echo(json.dumps(status, indent=2)) if as_json else _print_status(status)


@train.command("data")
@_model_option
@_json_option
def train_data(model: str | None, as_json: bool) -> None:
    """What the next run would train on (and hold out to judge the adapter)."""
    data = _query("train", "data", model=model)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if data.get("why"):
        click.echo(data["why"])
    for side in ("train", "held_out"):
        for e in data[side]:
            click.echo(f"{'held out' if side == 'held_out' else 'train':<9} {e['rating']}  {e['id'][:12]:<12} {e['question'][:70]}")
    total = len(data["train"]) + len(data["held_out"])
    click.echo(f"{total} exchanges rated {data.get('min_rating', 4)} or more ({len(data['held_out'])} held out), "
               f"{data['new']} new since the last run")


@train.command("run")
@_model_option
@click.option("--wait", is_flag=True, help="Show its progress and wait until the run has ended.")
def train_run(model: str | None, wait: bool) -> None:
    """Start a training run now (whatever the schedule says; the power rules still apply)."""
    job = _query("train", "run", model=model)["job"]
    click.echo(f"training job {job['id']}: {job['detail']}")
    if not wait:
        click.echo("`mirador jobs` shows its progress; `mirador train status` the outcome")
        return
    shown = ""
    while job["state"] not in ENDED:
        time.sleep(1.0)
        job = next((j for j in _query("jobs")["jobs"] if j["id"] == job["id"]), job)
        line = f"{job['state']}: {job['progress']}"
        if line != shown:
            click.echo(line)
            shown = line
    if job["state"] != "done":
        click.echo(f"the run ended {job['state']}: {job.get('why') or ''}", err=True)
        sys.exit(1)
    result = job.get("result") or {}
    click.echo(f"v{result.get('version')}: {'deployed' if result.get('deployed') else 'not deployed'}: {result.get('why')}")


@train.command("history")
@_model_option
@_json_option
def train_history(model: str | None, as_json: bool) -> None:
    """Every adapter version made for the model: deployed or not, and why."""
    history = _query("train", "history", model=model)
    if as_json:
        click.echo(json.dumps(history, indent=2))
        return
    for v in history["versions"]:
        mark = "*" if v["version"] == history["active"] else " "
        ev = v.get("evaluation") or {}
        gain = (ev.get("held_out") or {}).get("change")
        numbers = f"held-out {gain:+.3f}/token" if isinstance(gain, (int, float)) else ""
        click.echo(f"{mark} v{v['version']:<3} {_ago(v['created']):>9} {'deployed' if v['deployed'] else 'rejected':<9} "
                   f"{v.get('examples', 0):>4} examples  {numbers}  {v['why']}")
    if not history["versions"]:
        click.echo(f"{history['model']} has not been trained yet")


@train.command("rollback")
@_model_option
@click.argument("version", type=int, required=False)
def train_rollback(model: str | None, version: int | None) -> None:
    """Go back to an earlier deployed adapter (default: the one before the active one)."""
    _print_status(_query("train", "rollback", model=model, version=version))


@train.command("off")
@_model_option
def train_off(model: str | None) -> None:
    """Run the base model alone (adapters are kept; `rollback VERSION` brings one back)."""
    _print_status(_query("train", "off", model=model))
