"""Steering a running migration from another terminal: pause, resume, set.

The verbs only record settings (orchestrator.control.set_controls); the running apply
polls them every second and applies each change (orchestrator.control.Controls).
"""

from __future__ import annotations

import click

from orchestrator.cli.common import dsn_option, dsn_required, emit, handled, output_option, plan_argument
from orchestrator.control import describe, parse_assignments, set_controls
from orchestrator.plan import load_plan
from orchestrator.runner import Outcome


def _set(plan_file: str, dsn: str | None, settings: dict) -> tuple[str, dict, object]:
    plan = load_plan(plan_file)
    return set_controls(plan, dsn_required(dsn, plan), settings)


def _tail(live) -> str:
    if live is None:
        return " (no migration is running: it applies when apply starts)"
    return " (the running apply picks it up within a second)"


def _pause_switch(name: str, paused: bool, doc: str) -> click.Command:
    @click.command(name, help=doc)
    @plan_argument
    @dsn_option
    @output_option
    @handled
    def command(plan_file: str, dsn: str | None, output: str) -> None:
        table, result, live = _set(plan_file, dsn, {"paused": paused})
        word = "paused" if paused else "resumed"
        emit(Outcome(f"{table}: backfill {word}{_tail(live)}", {"table": table, "controls": result}), output)

    return command


pause_cmd = _pause_switch("pause", True, "Pause the backfill of a running apply before its next batch "
                          "(triggers keep running).")
resume_cmd = _pause_switch("resume", False, "Undo `orchestrate pause`: the backfill continues "
                           "(other throttle signals still apply).")


@click.command("set")
@plan_argument
@click.argument("assignments", nargs=-1, metavar="KEY=VALUE...")
@dsn_option
@output_option
@handled
def set_cmd(plan_file: str, assignments: tuple[str, ...], dsn: str | None, output: str) -> None:
    """Change a running migration: batch_size (or auto), workers, target_batch_seconds,
    sleep_ratio, and every throttle setting (max_replica_lag_s, resume_replica_lag_s,
    critical_replica_lag_s, max_slot_retained_bytes, max_xact_age_s, max_xmin_age, max_replay_lag_s,
    max_active_sessions, query, flag_file, backoff_max_s). `default` returns a setting to the plan;
    `off` turns an optional signal off."""
    settings = parse_assignments(assignments)
    table, result, live = _set(plan_file, dsn, settings)
    emit(Outcome(f"{table}: set {describe(settings)}{_tail(live)}", {"table": table, "controls": result}), output)


commands = [pause_cmd, resume_cmd, set_cmd]
