"""How results look to people: plan and status as text, and the live progress line.

JSON output is the Outcome's data as is; this module only renders it for a terminal.
"""

from __future__ import annotations

import json
import sys
import time

from loguru import logger


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan_text(data: dict) -> str:
    lines = [f"table     {data['table']}   (plan shape {data['plan_hash']})"]
    names = data.get("names") or {}
    if names:
        lines.append(f"names     twin {names.get('twin')}, retired {names.get('retired')}, "
                     f"default {names.get('default_partition')}")
    if not data.get("validated_against_database"):
        lines.append("checked   plan file only (no --dsn: the live table was not inspected)")
    est = data.get("estimates")
    if est:
        lines.append(f"estimate  ~{est['rows']} rows, {human_bytes(est['bytes'])}, {est['partitions']} partitions "
                     f"(incl. default), {est['rows_to_default_partition']} rows to the default partition, "
                     f"keys {est['key_min']} .. {est['key_max']}")
    mp = data.get("maintenance")
    if mp:
        lines.append(f"partitioned already: the next `orchestrate maintain` pass (now {mp['now'][:19]}) would")
        for c in mp["create"]:
            lines.append(f"  create {c['partition']} [{c['from']}, {c['to']})"
                         + (f", moving {c['default_rows_to_move']} rows out of the default"
                            if c["default_rows_to_move"] else ""))
        for r in mp["remove"]:
            lines.append(f"  {r['action']} {r['partition']} [{r['from']}, {r['to']})")
        if not mp["create"] and not mp["remove"]:
            lines.append("  change nothing")
    if data.get("in_progress"):
        ip = data["in_progress"]
        lines.append(f"running   migration {ip['id']} is {ip['status']} at phase {ip['phase']}")
    for g in data.get("gates") or []:
        lines.append(f"gate      {'ok' if g.get('ok') else 'waits'}: {g.get('gate')} ({g.get('detail')})")
    for w in data.get("warnings", []):
        lines.append(f"warning   {w}")
    parts = data.get("partitions") or []
    if parts:
        shown = ", ".join(p["name"] for p in parts[:3]) + (" ... " + parts[-1]["name"] if len(parts) > 3 else "")
        lines.append(f"partitions {shown}")
    for i, s in enumerate(data.get("steps", []), 1):
        lines.append("")
        lines.append(f"{i:>2}. [{s['phase']}] {s['action']}")
        lines.append(f"    lock: {s['lock']}")
        sql = s["sql"].strip()
        if len(sql) > 400:
            sql = sql[:400] + " ..."
        lines.append("    sql:  " + sql.replace("\n", "\n          "))
    return "\n".join(lines)


def status_text(data: dict) -> str:
    if data.get("status") == "none":
        return f"{data['table']}: no migration recorded"
    r = data["ranges"]
    lines = [
        f"table      {data['table']} (migration {data['migration_id']})",
        f"status     {data['status']}, phase {data['phase']}"
        + (f"  error: {data['error']}" if data.get("error") else ""),
        f"ranges     {r['copied']}/{r['total']} copied, {r['rows_copied']} rows, {r['verified']} verified, "
        f"{r['mismatched']} mismatched; last checkpoint {data['last_checkpoint']}",
    ]
    if r.get("mismatched_labels"):
        lines.append(f"mismatch   {', '.join(r['mismatched_labels'][:10])}")
    if not data.get("plan_matches", True):
        lines.append("plan       CHANGED since the run started: apply will refuse to resume")
    if data.get("controls"):
        lines.append(f"controls   {json.dumps(data['controls'])}")
    live = data.get("live") or {}
    if live:
        line = ProgressPrinter.format({**live, "throttle": live.get("throttle_reason") if live.get("throttled")
                                       else None})
        state = (f"apply running (pid {live.get('pid')})" if live.get("active") else "apply not running")
        lines.append(f"live       {line}")
        lines.append(f"           {state}; figures of {str(live.get('updated_at', '?'))[:19]}"
                     + ("; paused: the capture trigger keeps writes flowing to the twin" if live.get("paused")
                        else ""))
        if live.get("replay_waiting"):
            lines.append(f"           replay waits: {live['replay_waiting']} (changes wait in the log)")
    for w in data.get("warnings", []):
        lines.append(f"warning    {w}")
    lines.append("phases")
    for name, p in data["phases"].items():
        extra = ""
        if p["detail"].get("lock_held_ms") is not None:
            extra = f"  lock held {p['detail']['lock_held_ms']} ms"
        lines.append(f"  {name:<9} {p['state']:<8} {p['duration_s']:>9.1f}s{extra}")
    gates = (data.get("gates") or {}).get("gates") or []
    for g in gates:
        lines.append(f"gate       {'ok     ' if g.get('ok') else 'WAITING'} {g.get('gate')}: {g.get('detail')}")
    for e in data.get("recent_events", [])[-5:]:
        lines.append(f"event      {e['at'][:19]} {e['kind']}: {e['message']}")
    return "\n".join(lines)


class ProgressPrinter:
    """A live line on a terminal; one structured log line per interval otherwise."""

    def __init__(self, interval_s: float = 5.0, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = 0.5 if self.tty else interval_s
        self.last = 0.0
        self.shown = False

    def __call__(self, p: dict) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s and p.get("ranges_done") != p.get("ranges_total"):
            return
        self.last = now
        line = self.format(p)
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self.shown = True
        else:
            logger.bind(progress=p).info(line)

    @staticmethod
    def format(p: dict) -> str:
        parts = [f"{p.get('phase', '?')}", f"ranges {p.get('ranges_done', 0)}/{p.get('ranges_total', 0)}",
                 f"rows {p.get('rows', 0)}"]
        if p.get("rows_per_s") is not None:
            parts.append(f"{p['rows_per_s']} rows/s")
        if p.get("eta_s") is not None:
            parts.append(f"ETA {p['eta_s']}s")
        if p.get("batch_size") is not None:
            parts.append(f"batch {p['batch_size']}")
        if p.get("workers") is not None:
            parts.append(f"{p['workers']} worker{'s' if p['workers'] != 1 else ''}")
        if p.get("lag_s") is not None:
            parts.append(f"lag {p['lag_s']:.1f}s")
        if p.get("throttle"):
            parts.append(f"THROTTLED: {p['throttle']}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
