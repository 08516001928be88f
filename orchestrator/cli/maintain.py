"""``orchestrate maintain``: one pass, a dry run, or the daemon (orchestrator.maintain does the work)."""

from __future__ import annotations

import json
from datetime import datetime

import click

from orchestrator.cli.common import dsn_option, handled, output_option
from orchestrator.errors import PlanError
from orchestrator.maintain import maintain_pass, naive_utc, parse_every, run_daemon, summary
from orchestrator.plan import load_plan


@click.command("maintain")
@click.argument("plan_files", metavar="PLAN...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@dsn_option
@click.option("--now", "now_text", metavar="ISO", help="Pretend it is this time (UTC unless an offset is given).")
@click.option("--dry-run", is_flag=True, help="Show what the pass would create and remove; change nothing.")
@click.option("--daemon", is_flag=True, help="Run a pass every maintenance.interval until SIGTERM/SIGINT.")
@output_option
@handled
def maintain_cmd(plan_files: tuple[str, ...], dsn: str | None, now_text: str | None, dry_run: bool,
                 daemon: bool, output: str) -> None:
    """Create upcoming partitions, apply retention, move rows out of the default partition."""
    if not dsn:
        raise PlanError("no database given: pass --dsn or set ORCHESTRATE_DSN")
    plans = [load_plan(p) for p in plan_files]
    now = None
    if now_text:
        try:
            now = naive_utc(datetime.fromisoformat(now_text))
        except ValueError:
            raise PlanError(f"--now {now_text!r} is not an ISO date or datetime") from None
    if daemon:
        if now is not None or dry_run:
            raise PlanError("--daemon runs on the real clock and changes things: no --now or --dry-run")
        for plan in plans:
            parse_every(plan.maintenance.interval)
        raise SystemExit(run_daemon(plans, dsn))
    results = [maintain_pass(plan, dsn, now=now, dry_run=dry_run) for plan in plans]
    if output == "json":
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2, default=str))
    else:
        for r in results:
            click.echo(f"{r['table']}: {summary(r)}")


commands = [maintain_cmd]
