"""The plan: what a migration should do, as data (pydantic), loaded from YAML.

The model is the single source of truth: `plans/schema.json` is exported from it
(`orchestrate schema`), the examples in `plans/` are validated against it by the tests,
and a running migration records a hash of the fields that define its shape so that a
changed plan is refused on resume (:meth:`Plan.shape_hash`).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.db import LockPolicy
from orchestrator.errors import PlanError
from orchestrator.sql import MAX_IDENT, QualifiedName, fit_name, parse_qualified

_INTERVAL = re.compile(r"^\s*(\d+)\s*(day|week|month|year)s?\s*$", re.IGNORECASE)
_DURATION = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|"
    r"d|day|days)?\s*$",
    re.IGNORECASE,
)
_UNIT_S = {"ms": 0.001, "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600,
           "hrs": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


class Interval:
    """A calendar interval of whole days, weeks, months or years, with aligned bounds."""

    def __init__(self, count: int, unit: str):
        if count < 1:
            raise ValueError("an interval must be at least 1")
        self.count = count
        self.unit = unit

    @classmethod
    def parse(cls, text: str) -> Interval:
        m = _INTERVAL.match(str(text))
        if not m:
            raise ValueError(
                f"{text!r} is not an interval: use N day(s), N week(s), N month(s) or N year(s), e.g. '1 month'"
            )
        return cls(int(m.group(1)), m.group(2).lower())

    def __str__(self) -> str:
        return f"{self.count} {self.unit}{'s' if self.count > 1 else ''}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Interval) and (self.count, self.unit) == (other.count, other.unit)

    def __hash__(self) -> int:
        return hash((self.count, self.unit))

    # Bounds are naive datetimes meant as UTC (the orchestrator's sessions run in UTC).
    def floor(self, t: datetime) -> datetime:
        """The start of the interval containing t (intervals are aligned to an epoch)."""
        t = t.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        if self.unit == "day":
            epoch = datetime(2000, 1, 1)
            days = (t - epoch).days
            return epoch + timedelta(days=days - days % self.count)
        if self.unit == "week":
            epoch = datetime(2000, 1, 3)  # a Monday, like date_trunc('week')
            weeks = (t - epoch).days // 7
            return epoch + timedelta(weeks=weeks - weeks % self.count)
        if self.unit == "month":
            months = t.year * 12 + (t.month - 1)
            months -= months % self.count
            return datetime(months // 12, months % 12 + 1, 1)
        years = t.year - t.year % self.count
        return datetime(max(years, 1), 1, 1)

    def add(self, t: datetime, n: int = 1) -> datetime:
        if self.unit == "day":
            return t + timedelta(days=self.count * n)
        if self.unit == "week":
            return t + timedelta(weeks=self.count * n)
        if self.unit == "month":
            months = t.year * 12 + (t.month - 1) + self.count * n
            y, m = divmod(months, 12)
            return t.replace(year=y, month=m + 1, day=min(t.day, calendar.monthrange(y, m + 1)[1]))
        return t.replace(year=t.year + self.count * n)

    def suffix(self, t: datetime) -> str:
        """Partition name suffix, like pg_partman's: p2024, p2024_03, p2024_03_18."""
        if self.unit == "year":
            return f"p{t:%Y}"
        if self.unit == "month":
            return f"p{t:%Y_%m}"
        return f"p{t:%Y_%m_%d}"


def parse_duration(value: float | int | str) -> float:
    """Seconds from 0.5, '500ms', '2s', '1 min', '2 hours', '1 day': the plan's one duration parser."""
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration: use e.g. '200ms', '2s', '1 min'")
    return float(m.group(1)) * _UNIT_S.get((m.group(2) or "s").lower(), 1)


def _positive_duration(v: str) -> str:
    if parse_duration(v) <= 0:
        raise ValueError("must be positive")
    return v


def _lock_timeout(v: str) -> str:
    # PostgreSQL counts lock_timeout in whole milliseconds: less would become 0, no timeout at all.
    if parse_duration(_positive_duration(v)) < 0.001:
        raise ValueError("must be at least 1ms (PostgreSQL would read it as 0: no timeout at all)")
    return v


# The plan's duration fields: text such as '200ms' or '5 min', validated when the plan is read.
Duration = Annotated[str, AfterValidator(_positive_duration)]
LockTimeout = Annotated[str, AfterValidator(_lock_timeout)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartitionBy(_Strict):
    """How the new table is partitioned."""

    column: str = Field(description="The partition key: a timestamp, timestamptz or date column.")
    interval: str = Field(description="Partition width: '1 day', '1 week', '1 month', '3 months', '1 year'.")
    premake: int = Field(3, ge=0, le=1000, description="Partitions created ahead of now.")
    start: date | None = Field(
        None,
        description="Earliest partition's start. Default: the interval holding the oldest row. "
        "Older rows go to the default partition.",
    )
    max_partitions: int = Field(
        1000, ge=1, le=20000, description="Refuse a plan that would create more partitions than this."
    )

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: str) -> str:
        Interval.parse(v)
        return v

    @field_validator("column")
    @classmethod
    def _column(cls, v: str) -> str:
        if not v or len(v.encode()) > MAX_IDENT or "\x00" in v:
            raise ValueError(f"{v!r} is not a column name")
        return v

    @property
    def interval_value(self) -> Interval:
        return Interval.parse(self.interval)


class Backfill(_Strict):
    """How history is copied."""

    range: str = Field("1 day", description="Key range copied and checkpointed as one unit.")
    batch_size: int = Field(
        5000, ge=1, le=10_000_000, description="Starting rows per batch (adaptive unless fixed_batch_size)."
    )
    fixed_batch_size: bool = Field(False, description="Pin the batch size instead of adapting it.")
    min_batch_size: int = Field(500, ge=1)
    max_batch_size: int = Field(200_000, ge=1)
    target_batch_seconds: float = Field(0.5, gt=0, le=60, description="Adaptive batches aim at this duration.")
    sleep_ratio: float = Field(0.0, ge=0, le=100, description="Sleep this many times each batch's duration after it.")
    workers: int = Field(1, ge=1, le=32, description="Parallel backfill workers (disjoint ranges).")
    synchronous_commit: bool = Field(
        False,
        description="Backfill transactions commit with synchronous_commit off by default: each batch commits "
        "its checkpoint in the same transaction, so a server crash loses both together.",
    )

    lock_timeout: LockTimeout = Field(
        "100ms", description="Longest wait of a batch for a row lock, capped at half the server's "
        "deadlock_timeout: a batch that meets a lock held by the application rolls back (releasing its row "
        "locks), backs off and retries with a smaller window, so it never keeps a writer waiting and never "
        "wins a deadlock against the application.")

    @field_validator("range")
    @classmethod
    def _range(cls, v: str) -> str:
        Interval.parse(v)
        return v

    @property
    def lock_timeout_s(self) -> float:
        return parse_duration(self.lock_timeout)

    @model_validator(mode="after")
    def _bounds(self) -> Backfill:
        if self.min_batch_size > self.max_batch_size:
            raise ValueError("min_batch_size is larger than max_batch_size")
        return self

    @property
    def range_value(self) -> Interval:
        return Interval.parse(self.range)


class Verify(_Strict):
    """How the copy is proven."""

    mode: Literal["hash", "count"] = Field("hash", description="'hash': count and content hash per range.")
    workers: int = Field(2, ge=1, le=32, description="Ranges compared at once, each in its own session; "
                         "throttled like the backfill.")


class Cutover(_Strict):
    """The swap of the twin into the live table's name."""

    lock_timeout: LockTimeout = Field("200ms", description="Longest wait for the ACCESS EXCLUSIVE lock per attempt.")
    attempts: int = Field(30, ge=1, le=10_000, description="Lock attempts before giving up (nothing changed).")
    backoff_max: Duration = Field("5s", description="Cap of the exponential backoff between attempts.")
    postpone: bool = Field(False, description="Stop after verify; a later `apply --cutover` swaps.")
    incoming_foreign_keys: Literal["refuse", "drop"] = Field(
        "refuse", description="Foreign keys elsewhere that reference the table: refuse, or drop them at cutover."
    )
    views: Literal["recreate"] = "recreate"
    materialized_views: Literal["refuse"] = "refuse"
    gate_timeout: Duration = Field(
        "5 min", description="How long apply waits for the readiness gates (polling every second) before it "
        "gives up with exit 8, naming the gate.")
    max_blocker_age: Duration = Field(
        "30s", description="Readiness gate: no transaction older than this may hold a lock on the table "
        "(or the twin) when the cutover starts.")
    cancel_blockers: bool = Field(
        False, description="After cancel_blockers_after failed lock attempts, cancel the sessions that keep "
        "the lock from being granted (pg_cancel_backend; pg_terminate_backend when idle in transaction). "
        "Sessions that wrote to the table (hold ROW EXCLUSIVE or stronger) and orchestrate's own are never touched.")
    cancel_blockers_after: int | None = Field(
        None, ge=1, description="Failed attempts before blockers are cancelled (default: half of attempts).")

    @property
    def gate_timeout_s(self) -> float:
        return parse_duration(self.gate_timeout)

    @property
    def max_blocker_age_s(self) -> float:
        return parse_duration(self.max_blocker_age)

    @property
    def cancel_after(self) -> int:
        return self.cancel_blockers_after or max(1, self.attempts // 2)

    @property
    def lock_timeout_s(self) -> float:
        return parse_duration(self.lock_timeout)

    @property
    def backoff_max_s(self) -> float:
        return parse_duration(self.backoff_max)


class Capture(_Strict):
    """How the application's writes reach the twin while the migration runs."""

    mode: Literal["sync", "async"] = Field(
        "sync", description="'sync': a trigger writes the twin in the writer's transaction (no lag; costs the "
        "writer a write into an equally indexed table). 'async': the trigger appends the changed row's key to a "
        "narrow change log, and apply replays it into the twin (lag to drain; measured 0.57x of the writes' "
        "throughput against 0.45x for sync in the same bench rounds, 0.69x while the replay waits). See README "
        "\"Capture modes\".")
    replay_batch: int = Field(2000, ge=1, le=1_000_000, description="Async: log rows replayed per transaction.")
    replay_throttled: bool = Field(
        True, description="Async: the replay waits, like the backfill, while the server says it is overloaded: "
        "replica lag, WAL retained by slots, max_active_sessions, the throttle query or flag file (never for "
        "pause, nor for its own lag, nor once the cutover's gates have passed). Its writes into the twin are "
        "the async mode's cost; held, they wait for a quieter moment, as gh-ost's binlog apply does. The "
        "cutover's gates wait too.")
    max_pending_at_cutover: int = Field(
        2000, ge=0, le=10_000_000, description="Async: the cutover takes its lock only once at most this many "
        "changes wait in the log (a readiness gate).")
    max_lock_replay: int = Field(
        10_000, ge=1, le=10_000_000, description="Async: under the cutover lock, at most this many changes are "
        "replayed; more rolls the attempt back and retries (the lock budget).")


class Names(_Strict):
    """Names of the objects the migration creates (defaults derive from the table name)."""

    twin: str | None = Field(None, description="The partitioned twin while it is built. Default <table>_partitioned.")
    retired: str | None = Field(None, description="The old table after cutover. Default <table>_retired.")
    default_partition: str | None = Field(None, description="Default <table>_default.")


class Throttle(_Strict):
    """When the backfill waits (each threshold can be changed at run time)."""

    max_replica_lag_s: float = Field(10.0, gt=0, description="Pause when a replica lags more than this.")
    resume_replica_lag_s: float | None = Field(None, description="Resume below this (default half the pause).")
    critical_replica_lag_s: float | None = Field(None, description="Abort the run past this lag.")
    max_slot_retained_bytes: int | None = Field(None, ge=0, description="Pause when slots retain more WAL.")
    max_xact_age_s: float | None = Field(None, gt=0, description="Pause while a transaction is older than this.")
    max_xmin_age: int | None = Field(
        None, gt=0, description="Pause while the oldest xmin that holds back vacuum (a session's snapshot, a "
        "replication slot, a prepared transaction) is more than this many transactions old.")
    max_replay_lag_s: float | None = Field(
        60.0, gt=0, description="Async capture: pause the backfill while the oldest change waiting in the change "
        "log is older than this (the replay is falling behind; the backfill gives it the server back). "
        "Ignored in sync mode.")
    max_active_sessions: int | None = Field(
        None, ge=1, description="Pause while more than this many sessions of the database are running a "
        "statement (state 'active', orchestrate's own excluded): the server's load, as gh-ost's max-load "
        "Threads_running. Needs pg_monitor (fails closed without it).")
    query: str | None = Field(None, description="Operator's SQL: throttle while it returns true.")
    flag_file: str | None = Field(None, description="Throttle while this file exists.")
    replicas: list[str] = Field(default_factory=list, description="Replica DSNs to watch (plus --replica-dsn).")
    replicas_env: list[str] = Field(
        default_factory=list, description="Names of environment variables that each hold a replica DSN "
        "(so the plan holds no password).")
    backoff_max_s: float = Field(30.0, gt=0)
    heartbeat: bool = Field(True, description="Write a heartbeat row so lag is exact on an idle primary.")

    @field_validator("replicas_env")
    @classmethod
    def _env_names(cls, v: list[str]) -> list[str]:
        for name in v:
            _env_name(name)
        return v

    @property
    def all_replicas(self) -> list[str]:
        """throttle.replicas plus the DSNs held by the variables named in replicas_env."""
        return [*self.replicas, *(env_value(name, "throttle.replicas_env") for name in self.replicas_env)]


class Retention(_Strict):
    """What maintain does with partitions that fall out of the window."""

    keep: int | None = Field(None, ge=1, description="Keep this many intervals before the current one.")
    action: Literal["drop", "detach", "archive"] = "detach"
    archive_schema: str | None = None


class Distribute(_Strict):
    """Distribute the new partitioned table over Citus workers in the same migration."""

    column: str = Field(description="The distribution column (e.g. tenant_id): NOT NULL, never updated by the "
                        "application once cut over (Citus refuses that). It joins the twin's primary key and "
                        "every unique index, because Citus enforces uniqueness only within one shard.")
    shard_count: int | None = Field(None, ge=1, le=64000, description="Shards per partition (default: "
                                    "the coordinator's citus.shard_count).")
    colocate_with: str | None = Field(None, description="A distributed table to colocate with ('none' for a new "
                                      "colocation group; default: Citus' default group for the column type).")
    accept_no_rollback_after_cutover: bool = Field(
        False, description="Acknowledge that a rollback after the cutover loses the writes made since it: "
        "a trigger on a distributed table runs on the workers' shards and cannot write the coordinator's retired "
        "heap table, so there is no reverse sync in distributed mode. apply refuses to cut over without it "
        "(it stops after verify, like cutover.postpone).")

    @field_validator("column")
    @classmethod
    def _column(cls, v: str) -> str:
        if not v or len(v.encode()) > MAX_IDENT or "\x00" in v:
            raise ValueError(f"{v!r} is not a column name")
        return v


class Maintenance(_Strict):
    interval: Duration = Field("1 hour", description="How often `maintain --daemon` runs a pass.")

    @property
    def interval_s(self) -> float:
        return parse_duration(self.interval)


class Plan(_Strict):
    """A migration plan (version 1)."""

    version: Literal[1] = 1
    table: str = Field(description="schema.table of the live heap table (PostgreSQL quoting rules).")
    dsn_env: str | None = Field(
        None, description="Name of an environment variable holding the DSN, used when neither --dsn nor "
        "ORCHESTRATE_DSN is given (so the plan holds no password).")
    partition_by: PartitionBy
    backfill: Backfill = Backfill()
    verify: Verify = Verify()
    cutover: Cutover = Cutover()
    capture: Capture = Capture()
    names: Names = Names()
    throttle: Throttle = Throttle()
    retention: Retention = Retention()
    maintenance: Maintenance = Maintenance()
    acknowledge_statements: list[str] = Field(
        default_factory=list, description="queryids (pg_stat_statements) of the application's statements that "
        "`plan` says will fail after cutover, acknowledged: apply refuses while one is not listed here.")
    distribute: Distribute | None = Field(
        None, description="Distribute the new table over Citus workers (needs a Citus coordinator); see README "
        "\"When one machine is not enough\".")
    guard_ddl: bool = Field(False, description="While migrated, refuse ALTER TABLE / CREATE INDEX / DROP on the "
                            "table with an event trigger (needs a superuser; `plan` says when it cannot).")

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        parse_qualified(v)
        return v

    @field_validator("dsn_env")
    @classmethod
    def _dsn_env(cls, v: str | None) -> str | None:
        return None if v is None else _env_name(v)

    def for_state(self) -> dict:
        """The plan as recorded in the state schema: replica DSNs without their passwords."""
        from orchestrator.db import redact

        data = self.model_dump(mode="json")
        data["throttle"]["replicas"] = [redact(d) for d in self.throttle.replicas]
        return data

    @model_validator(mode="after")
    def _names(self) -> Plan:
        for n in (self.twin.name, self.retired.name, self.default_partition.name):
            if len(n.encode()) > MAX_IDENT:
                raise ValueError(f"derived name {n!r} is longer than {MAX_IDENT} bytes: set it under names:")
        if len({self.table_name, self.twin, self.retired}) != 3:
            raise ValueError("names.twin and names.retired must differ from each other and from the table")
        if self.distribute is not None and self.capture.mode == "async":
            # The change log's replay and its cutover drain were built and proven on one node only.
            raise ValueError("capture.mode async is not supported with distribute: (use the default, sync)")
        return self

    # --- derived names -------------------------------------------------------------
    @property
    def table_name(self) -> QualifiedName:
        return parse_qualified(self.table)

    @property
    def locks(self) -> LockPolicy:
        """The one lock policy of every locked step (cutover.lock_timeout / attempts / backoff_max)."""
        c = self.cutover
        return LockPolicy(c.lock_timeout_s, c.attempts, c.backoff_max_s)

    @property
    def twin(self) -> QualifiedName:
        return self.table_name.with_name(self.names.twin or fit_name(self.table_name.name, "_partitioned"))

    @property
    def retired(self) -> QualifiedName:
        return self.table_name.with_name(self.names.retired or fit_name(self.table_name.name, "_retired"))

    @property
    def default_partition(self) -> QualifiedName:
        return self.table_name.with_name(self.names.default_partition or fit_name(self.table_name.name, "_default"))

    def partition_name(self, start: datetime) -> QualifiedName:
        suffix = "_" + self.partition_by.interval_value.suffix(start)
        return self.table_name.with_name(fit_name(self.table_name.name, suffix))

    def shape_hash(self) -> str:
        """Hash of the fields that fix what the migration builds; resuming needs the same."""
        shape = {
            "table": str(self.table_name),
            "partition_by": self.partition_by.model_dump(mode="json"),
            "range": str(self.backfill.range_value),
            "names": [str(self.twin), str(self.retired), str(self.default_partition)],
        }
        if self.capture.mode != "sync":
            # The installed capture is one or the other: resuming in the other mode is refused.
            shape["capture"] = self.capture.mode
        if self.distribute is not None:  # only then: hashes of plans without it stay as they were
            shape["distribute"] = self.distribute.model_dump(
                mode="json", include={"column", "shard_count", "colocate_with"})
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(name: str) -> str:
    if not _ENV_NAME.match(name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return name


def env_value(name: str, field: str) -> str:
    """The value of the environment variable ``name`` named by the plan's ``field``."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise PlanError(f"environment variable {name} (named by {field} in the plan) is not set")
    return value


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "plan"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def parse_plan(data: object, source: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise PlanError(f"{source}: the plan must be a YAML mapping")
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        raise PlanError(f"{source}: {_first_error(e)}") from None


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; any problem is a PlanError with one line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PlanError(f"cannot read plan {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise PlanError(f"{p}: malformed YAML{where}: {problem}") from None
    return parse_plan(data, str(p))


def json_schema() -> dict:
    schema = Plan.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "orchestrate plan"
    return schema


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
