"""The command line: the click group and its verbs, one module per group of verbs.

  migrate   plan, apply, status, rollback, finalize, schema
  steer     pause, resume, set (another terminal steering a running apply)
  maintain  maintain (one pass, a dry run, or the daemon)
  lab       demo, bench (local servers: orchestrator.lab)

Shared options and the error boundary are in ``common``; how results look on a terminal
in ``report``. The command line imports the engine and the lab; neither imports it.
"""

from __future__ import annotations

import click

from orchestrator import __version__
from orchestrator.cli import lab, maintain, migrate, steer
from orchestrator.cli.common import setup_logging
from orchestrator.errors import EXIT_CODES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orchestrate")
@click.option("--log-level", default="INFO", show_default=True, envvar="ORCHESTRATE_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              envvar="ORCHESTRATE_LOG_FORMAT", help="json: one JSON object per log line, for machines.")
def cli(log_level: str, log_format: str) -> None:
    """Zero-downtime range partitioning of live PostgreSQL tables."""
    setup_logging(log_level.upper(), log_format)


cli.help = (cli.help or "") + "\n\n\b\nExit codes:\n" + "\n".join(f"  {k:>2}  {v}" for k, v in EXIT_CODES.items())

for _module in (migrate, steer, maintain, lab):
    for _command in _module.commands:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="orchestrate")


__all__ = ["cli", "main"]
