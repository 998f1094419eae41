"""``mirador jobs`` and ``mirador cache``: the daemon's background work and its answer cache."""

from __future__ import annotations

import json
import time
from typing import Any

import click


def _query(method: str, *args: Any, **fields: Any) -> dict[str, Any]:
    from .cli import _query as query  # cli imports this module: import it when a command runs

    return query(method, *args, **fields)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago" if seconds < 7200 else f"{seconds / 3600:.0f}h ago"


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
@click.pass_context
def jobs(ctx: click.Context, as_json: bool) -> None:
    """Background jobs (typing-time prefill, follow-up speculation): running and recent ones,
    what they cost and what they saved. `mirador jobs cancel ID` stops one."""
    if ctx.invoked_subcommand is not None:
        return
    listed = _query("jobs")
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    click.echo(f"{'ID':<11} {'KIND':<10} {'STAGE':<10} {'STATE':<10} {'STARTED':>9} {'MODEL S':>8} {'TOKENS':>7} {'SAVED S':>8}  PROGRESS")
    for job in listed["jobs"]:
        note = job["progress"] or job["detail"]
        if job.get("why") and job["state"] in ("cancelled", "skipped", "failed"):
            note = job["why"]
        click.echo(f"{job['id']:<11} {job['kind']:<10} {job['stage']:<10} {job['state']:<10} {_ago(job['started'] or job['created']):>9} "
                   f"{job['cost']['model_s']:>8.2f} {job['cost']['tokens']:>7} {job['saved']['s']:>8.2f}  {note[:60]}")
    if not listed["jobs"]:
        click.echo("no jobs yet")
    budget = listed["budget"]
    limit = f"{budget['daily_cpu_s']:.0f} s" if budget["daily_cpu_s"] else "no limit"
    click.echo(f"today: {budget['spent_today_s']:.1f} s of model time ({limit}); last minute: {budget['share_used']:.0%} "
               f"of the {budget['cpu_share']:.0%} share")
    if listed["allowed"]:
        click.echo(f"no jobs run now: {listed['allowed']}")


@jobs.command("cancel")
@click.argument("job_id")
def jobs_cancel(job_id: str) -> None:
    """Stop a running or waiting job (its model work stops at the next token)."""
    _query("cancel_job", job_id)
    click.echo(f"cancelled {job_id}")


@click.group()
def cache() -> None:
    """The answer cache: quick answers kept for questions asked again in other words."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True)
def cache_list(as_json: bool) -> None:
    """The cached answers, newest first."""
    entries = _query("cache", "list")["entries"]
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    for e in entries:
        click.echo(f"{e['id'][:12]:<12} {e['source']:<9} hits {e.get('hits', 0):<3} {_ago(e.get('ts')):>9}  {e['question'][:70]}")
    if not entries:
        click.echo("the answer cache is empty")


@cache.command("clear")
def cache_clear() -> None:
    """Drop every cached answer."""
    click.echo(f"cleared {_query('cache', 'clear')['cleared']} cached answers")


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True)
def cache_stats(as_json: bool) -> None:
    """Hits, lookups, time saved and the background tokens spent on the cache."""
    stats = _query("cache", "stats")
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"{stats['entries']} entries; {stats['hits']} hits of {stats['lookups']} lookups ({stats['hit_rate']:.0%}); "
               f"saved {stats['saved_s']:.2f} s; background tokens {stats['tokens_spent']} spent, {stats['tokens_used']} used")
