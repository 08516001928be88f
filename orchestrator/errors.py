"""Errors the CLI turns into one line and an exit code.

Every failure a user can cause or meet is one of these types; the CLI prints
``error: <message>`` and exits with the type's code. Anything else is a bug
(exit 1). The table of codes is documented in README.md ("Exit codes").
"""

from __future__ import annotations


class OrchestrateError(Exception):
    """Base of all expected failures: carries its exit code and a one-line message."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.message).split())


class PlanError(OrchestrateError):
    """The plan file is unreadable, malformed or invalid."""

    exit_code = 2


class BadEndpoint(OrchestrateError):
    """The DSN points at an endpoint orchestrate cannot work through (a transaction-mode pooler).

    Exit 2, like other bad input: the fix is a different --dsn, nothing was done, and running
    again unchanged can never succeed.
    """

    exit_code = 2


class PreflightError(OrchestrateError):
    """The live table cannot be migrated as planned (shape, type, references)."""

    exit_code = 3


class ConnectionFailed(OrchestrateError):
    """The database could not be reached or the connection was lost."""

    exit_code = 4


class Busy(OrchestrateError):
    """Another orchestrate process holds this table's migration lock."""

    exit_code = 5


class VerificationFailed(OrchestrateError):
    """The twin does not hold the same rows as the live table."""

    exit_code = 6


class LockNotAcquired(OrchestrateError):
    """A short lock could not be taken within its attempts: nothing changed, retry later."""

    exit_code = 7


class StateConflict(OrchestrateError):
    """The recorded migration state does not allow this command (plan changed, wrong phase)."""

    exit_code = 8


class ThrottleAbort(OrchestrateError):
    """A throttle signal passed its critical threshold: the run stopped to protect the cluster."""

    exit_code = 9


class Interrupted(OrchestrateError):
    """The run was stopped on request (signal, pause with --until); resumable."""

    exit_code = 10


EXIT_CODES = {
    0: "success (or nothing to do)",
    1: "internal error (a bug: please report it with the log)",
    2: "bad plan or bad command-line input (also a --dsn that points at a transaction-mode pooler)",
    3: "preflight refused: the table cannot be migrated as planned",
    4: "database unreachable or connection lost (resumable)",
    5: "another orchestrate run holds this table's migration lock",
    6: "verification failed: the twin differs from the live table (names the ranges)",
    7: "a lock could not be taken within the allowed attempts; nothing changed, run again",
    8: "state conflict: plan changed since the run started, or the phase does not allow this",
    9: "a throttle signal passed its critical threshold; the run stopped (resumable)",
    10: "interrupted on request (resumable)",
}
