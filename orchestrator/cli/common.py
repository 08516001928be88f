"""What every verb shares: logging set-up, the --dsn/--output options, the error boundary.

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

from orchestrator.errors import OrchestrateError, PlanError


def setup_logging(level: str, fmt: str) -> None:
    logger.remove()
    # diagnose/backtrace off: loguru's diagnose prints every local variable of a traceback
    # frame, DSNs and passwords included.
    if fmt == "json":
        logger.add(sys.stderr, level=level, serialize=True, diagnose=False, backtrace=False)
    else:
        logger.add(sys.stderr, level=level,
                   format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}",
                   colorize=None, diagnose=False, backtrace=False)


def emit(outcome, output: str, text_renderer=None) -> None:
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


def dsn_required(dsn: str | None, plan=None) -> str:
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
