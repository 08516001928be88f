"""The migration's verbs: plan, apply, status, rollback, finalize, schema.

Parse, call the runner, print: no logic here (orchestrator.runner is the state machine).
"""

from __future__ import annotations

import json
import os
import sys

import click

from orchestrator import runner
from orchestrator.cli import report
from orchestrator.cli.common import dsn_option, dsn_required, emit, handled, output_option, plan_argument
from orchestrator.errors import PlanError
from orchestrator.plan import json_schema, load_plan
from orchestrator.state.store import PHASES
from orchestrator.status import json_schema as status_schema


@click.command("plan")
@plan_argument
@dsn_option
@output_option
@handled
def plan_cmd(plan_file: str, dsn: str | None, output: str) -> None:
    """Validate PLAN (against the live table with --dsn) and print the ordered steps. Changes nothing."""
    plan = load_plan(plan_file)
    if not dsn and plan.dsn_env and os.environ.get(plan.dsn_env):  # unset: validate the file alone
        dsn = dsn_required(dsn, plan)
    emit(runner.make_plan(plan, dsn), output, report.plan_text)


@click.command("apply")
@plan_argument
@dsn_option
@click.option("--until", type=click.Choice(PHASES), help="Stop once this phase is complete.")
@click.option("--replica-dsn", "replica_dsns", multiple=True,
              help="A replica to watch for lag (repeatable; env ORCHESTRATE_REPLICA_DSN holds one).")
@click.option("--cutover/--no-cutover", "cutover", default=None,
              help="Cut over now even if the plan postpones it (or hold it back).")
@click.option("--recopy", multiple=True, metavar="RANGE",
              help="Re-copy a range (by its label in status, or 'all' for the mismatched ones) before verifying.")
@click.option("--workers", type=click.IntRange(1, 32), help="Backfill workers (overrides the plan).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics endpoint listens on (0.0.0.0: every interface).")
@output_option
@handled
def apply_cmd(plan_file: str, dsn: str | None, until: str | None, replica_dsns: tuple[str, ...],
              cutover: bool | None, recopy: tuple[str, ...], workers: int | None, metrics_port: int | None,
              metrics_host: str, output: str) -> None:
    """Run or resume the migration: prepare, capture, backfill, verify, cutover."""
    plan = load_plan(plan_file)
    dsn = dsn_required(dsn, plan)
    # Taken verbatim: a keyword DSN ("host=... port=...") contains spaces, so nothing here
    # may split on them. More replicas: repeat the flag or list them under throttle.replicas.
    replicas = tuple(replica_dsns) or tuple(filter(None, [os.environ.get("ORCHESTRATE_REPLICA_DSN", "").strip()]))
    progress = report.ProgressPrinter()
    options = {"workers": workers, "metrics_port": metrics_port, "metrics_host": metrics_host}
    try:
        outcome = runner.apply(plan, dsn, until=until, replica_dsns=replicas, cutover=cutover, recopy=recopy,
                               progress=progress, options=options)
    finally:
        progress.close()
    emit(outcome, output)


@click.command("status")
@plan_argument
@dsn_option
@output_option
@handled
def status_cmd(plan_file: str, dsn: str | None, output: str) -> None:
    """Show the migration's phase, range progress, checkpoints and phase durations."""
    plan = load_plan(plan_file)
    emit(runner.status(plan, dsn_required(dsn, plan)), output, report.status_text)


@click.command("rollback")
@plan_argument
@dsn_option
@output_option
@handled
def rollback_cmd(plan_file: str, dsn: str | None, output: str) -> None:
    """Go back to the original table under its original name, from any phase (also after cutover)."""
    plan = load_plan(plan_file)
    emit(runner.rollback(plan, dsn_required(dsn, plan)), output)


@click.command("finalize")
@plan_argument
@dsn_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@output_option
@handled
def finalize_cmd(plan_file: str, dsn: str | None, yes: bool, output: str) -> None:
    """Drop the retired table and the reverse trigger. This destroys the way back."""
    plan = load_plan(plan_file)
    dsn = dsn_required(dsn, plan)
    if not yes:
        if not sys.stdin.isatty():
            raise PlanError("finalize drops the retired table and ends any chance of rollback: pass --yes to confirm")
        click.confirm(f"Drop {plan.retired} and the reverse trigger? Rollback will no longer be possible", abort=True)
    emit(runner.finalize(plan, dsn), output)


@click.command("schema")
@click.argument("of", type=click.Choice(["plan", "status"]), default="plan")
def schema_cmd(of: str) -> None:
    """Print the JSON schema of a plan (plans/schema.json) or of `status -o json` (plans/status.schema.json)."""
    click.echo(json.dumps(json_schema() if of == "plan" else status_schema(), indent=2))


commands = [plan_cmd, apply_cmd, status_cmd, rollback_cmd, finalize_cmd, schema_cmd]
