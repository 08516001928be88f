"""Helpers shared by tests (import with ``from helpers import run_cli, wait_until``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 300,
    cwd: str | os.PathLike[str] | None = None,
) -> tuple[int, str, str]:
    """Run ``python -m orchestrator ARGS`` in a subprocess; return (exit code, stdout, stderr).

    ``env`` is added to the current environment (it does not replace it).
    """
    full_env = {**os.environ, **(env or {})}
    # Keep the child's output plain and unbuffered so tests can match it.
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.setdefault("NO_COLOR", "1")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", *map(str, args)],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=str(cwd) if cwd is not None else str(REPO_ROOT),
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


def wait_until(
    predicate: Callable[[], T], timeout: float = 30, interval: float = 0.05, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout:g}s")
        time.sleep(interval)
