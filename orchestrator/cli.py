"""The command line: parse, call the runner, print. One function per verb, no logic.

Every expected failure is an OrchestrateError: printed as one line `error: ...` on stderr
with its exit code (README: "Exit codes"). Anything else is a bug: exit 1 with the
exception's one-line summary (a traceback only with ORCHESTRATE_DEBUG=1).
"""

from __future__ import annotations

import json
import os
import sys
from functools import wraps

import click
from loguru import logger

from orchestrator import __version__
from orchestrator.errors import EXIT_CODES, OrchestrateError, PlanError
from orchestrator.plan import json_schema, load_plan
from orchestrator.state.store import PHASES


def _setup_logging(level: str, fmt: str) -> None:
    logger.remove()
    # diagnose/backtrace off: loguru's diagnose prints every local variable of a traceback
    # frame, DSNs and passwords included.
    if fmt == "json":
        logger.add(sys.stderr, level=level, serialize=True, diagnose=False, backtrace=False)
    else:
        logger.add(sys.stderr, level=level,
                   format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}",
                   colorize=None, diagnose=False, backtrace=False)


def _emit(outcome, output: str, text_renderer=None) -> None:
    if output == "json":
        click.echo(json.dumps({"message": outcome.message, **outcome.data}, indent=2, default=str))
    else:
        click.echo(text_renderer(outcome.data) if text_renderer else outcome.message)


def handled(fn):
    """Map failures to one line and an exit code; never a traceback for expected errors."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OrchestrateError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; run the same command again to resume", err=True)
            sys.exit(10)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if os.environ.get("ORCHESTRATE_DEBUG"):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            click.echo(f"error: internal error: {type(e).__name__}: {first} (ORCHESTRATE_DEBUG=1 for a traceback)",
                       err=True)
            sys.exit(1)

    return wrapper


def _dsn_required(dsn: str | None, plan=None) -> str:
    """--dsn, else ORCHESTRATE_DSN, else the variable the plan names in ``dsn_env``."""
    if not dsn and plan is not None and plan.dsn_env:
        from orchestrator.plan import env_value

        return env_value(plan.dsn_env, "dsn_env")
    if not dsn:
        raise PlanError("no database given: pass --dsn or set ORCHESTRATE_DSN "
                        "(or name a variable in the plan's dsn_env)")
    return dsn


dsn_option = click.option("--dsn", envvar="ORCHESTRATE_DSN", help="libpq DSN or URL (env ORCHESTRATE_DSN).")
output_option = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True)
plan_argument = click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orchestrate")
@click.option("--log-level", default="INFO", show_default=True, envvar="ORCHESTRATE_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              envvar="ORCHESTRATE_LOG_FORMAT", help="json: one JSON object per log line, for machines.")
def cli(log_level: str, log_format: str) -> None:
    """Zero-downtime range partitioning of live PostgreSQL tables."""
    _setup_logging(log_level.upper(), log_format)


cli.help = (cli.help or "") + "\n\n\b\nExit codes:\n" + "\n".join(f"  {k:>2}  {v}" for k, v in EXIT_CODES.items())


@cli.command("plan")
@plan_argument
@dsn_option
@output_option
@handled
def plan_cmd(plan_file: str, dsn: str | None, output: str) -> None:
    """Validate PLAN (against the live table with --dsn) and print the ordered steps. Changes nothing."""
    from orchestrator import report, runner

    plan = load_plan(plan_file)
    if not dsn and plan.dsn_env and os.environ.get(plan.dsn_env):  # unset: validate the file alone
        dsn = _dsn_required(dsn, plan)
    _emit(runner.make_plan(plan, dsn), output, report.plan_text)


@cli.command("apply")
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
    from orchestrator import report, runner

    plan = load_plan(plan_file)
    dsn = _dsn_required(dsn, plan)
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
    _emit(outcome, output)


@cli.command("status")
@plan_argument
@dsn_option
@output_option
@handled
def status_cmd(plan_file: str, dsn: str | None, output: str) -> None:
    """Show the migration's phase, range progress, checkpoints and phase durations."""
    from orchestrator import report, runner

    plan = load_plan(plan_file)
    _emit(runner.status(plan, _dsn_required(dsn, plan)), output, report.status_text)


@cli.command("rollback")
@plan_argument
@dsn_option
@output_option
@handled
def rollback_cmd(plan_file: str, dsn: str | None, output: str) -> None:
    """Go back to the original table under its original name, from any phase (also after cutover)."""
    from orchestrator import runner

    plan = load_plan(plan_file)
    _emit(runner.rollback(plan, _dsn_required(dsn, plan)), output)


@cli.command("finalize")
@plan_argument
@dsn_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@output_option
@handled
def finalize_cmd(plan_file: str, dsn: str | None, yes: bool, output: str) -> None:
    """Drop the retired table and the reverse trigger. This destroys the way back."""
    from orchestrator import runner

    plan = load_plan(plan_file)
    dsn = _dsn_required(dsn, plan)
    if not yes:
        if not sys.stdin.isatty():
            raise PlanError("finalize drops the retired table and ends any chance of rollback: pass --yes to confirm")
        click.confirm(f"Drop {plan.retired} and the reverse trigger? Rollback will no longer be possible", abort=True)
    _emit(runner.finalize(plan, dsn), output)


@cli.command("schema")
def schema_cmd() -> None:
    """Print the plan's JSON schema (plans/schema.json is this output)."""
    click.echo(json.dumps(json_schema(), indent=2))


@cli.command("demo")
@click.option("--rows", default=1_000_000, show_default=True, type=click.IntRange(1000))
@click.option("--days", default=365, show_default=True, type=click.IntRange(2))
@click.option("--clients", default=4, show_default=True, type=click.IntRange(0, 64))
@click.option("--keep", is_flag=True, help="Leave the cluster running at the end (prints its DSN).")
@click.option("--distributed", is_flag=True, help="On a local Citus coordinator + 2 workers: partition AND "
              "distribute by customer_id in one migration (needs Citus, see README).")
@handled
def demo_cmd(rows: int, days: int, clients: int, keep: bool, distributed: bool) -> None:
    """Start a local PostgreSQL, build a live `orders` table and migrate it under a write workload."""
    if distributed:
        from orchestrator import demo_distributed

        demo_distributed.run(rows=rows, days=days, clients=clients, keep=keep)
        return
    from orchestrator import demo

    demo.run(rows=rows, days=days, clients=clients, keep=keep)


# Verbs that live with their subsystem: each module exposes `commands` (click commands).
_EXTENSIONS = ("orchestrator.control", "orchestrator.maintain", "orchestrator.bench")


def _register_extensions() -> None:
    import importlib

    for name in _EXTENSIONS:
        module = importlib.import_module(name)
        for command in module.commands:
            cli.add_command(command)


_register_extensions()


def main() -> None:
    cli(prog_name="orchestrate")


if __name__ == "__main__":
    main()
