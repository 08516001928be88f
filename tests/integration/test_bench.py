"""`orchestrate bench --quick` end to end: every section is measured and both files are written.

The benchmark starts its own local cluster (no replica), so this test does not use the
session cluster; it keeps the command from rotting, not the figures from regressing.
"""

from __future__ import annotations

import json
import numbers

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli

pytestmark = pytest.mark.slow


def _numeric(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["bench", "--quick", "--rows", "20000", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output

    data = json.loads((out / "benchmarks.json").read_text())
    for section in ("machine", "postgres", "backfill", "dual_write", "cutover", "verify_rss", "targets"):
        assert section in data, section
    assert data["quick"] is True and data["rows"] == 20000
    assert data["machine"]["cores"] >= 1 and data["postgres"]["version"]

    b = data["backfill"]
    assert _numeric(b["ceiling"]["seconds"]) and b["ceiling"]["rows_per_s"] > 0
    for key in ("single_worker", "two_workers"):
        assert _numeric(b[key]["seconds"]) and b[key]["rows_per_s"] > 0 and _numeric(b[key]["ratio"])
        assert b[key]["rows_copied"] == 20000
    # The split copies: every row, in the backfill's ranges (a 1-day range over 365 days).
    assert b["split"]["ranges"] >= 365
    for key in ("plain", "for_share"):
        assert _numeric(b["split"][key]["seconds"]) and _numeric(b["split"][key]["ratio"])
    pm = b["pg_partman"]
    assert pm["status"] == "not installed" or (_numeric(pm["seconds"]) and pm["rows"] == 20000)

    d = data["dual_write"]
    assert [r["trigger"] for r in d["runs"]] == ["without", "with", "without", "with"]
    assert all(_numeric(r["tps"]) and r["tps"] > 0 for r in d["runs"])
    assert _numeric(d["ratio"]) and d["ratio"] > 0
    a = d["async"]  # async capture, the replay running in the same server
    assert [r["capture"] for r in a["runs"]] == ["without", "empty trigger", "sync", "async",
                                                  "async, replay waits on load"] * 2
    # The load signal (pgbench's 4 clients > 2) held apply's replay thread for part of each run.
    assert all(r["replay_waited_s"] > 0 for r in a["runs"] if r["capture"] == "async, replay waits on load")
    assert all(r["pending_after_run"] == 0 for r in a["runs"] if r["capture"] in ("empty trigger", "without"))
    assert _numeric(a["held_ratio"]) and _numeric(a["empty_trigger_ratio"])
    assert all(r["tps"] > 0 for r in a["runs"]) and _numeric(a["ratio"]) and a["ratio"] > 0
    assert all(r["replayed_during_run"] > 0 for r in a["runs"] if r["capture"] == "async")
    assert _numeric(a["sync_ratio"]) and a["sync_ratio"] > 0

    c = data["cutover"]
    for key in ("lock_held_ms", "worst_write_latency_ms", "p99_write_latency_ms", "lock_timeout_ms"):
        assert _numeric(c[key]), key
    assert c["lock_held_ms"] > 0 and c["pgbench"]["transactions"] > 0

    v = data["verify_rss"]
    assert [s["rows"] for s in v["sizes"]] == [20000, 40000]
    for s in v["sizes"]:
        assert s["verify_rows_per_s"] > 0 and s["peak_rss_mb"] > 10

    vs = data["verify_speed"]
    assert vs["verify_seconds"] > 0
    assert vs["ratio"] == pytest.approx(vs["backfill_seconds"] / vs["verify_seconds"], rel=0.02)
    cs = data["cutover_scaling"]
    # The two migrations really had about 40 and about 1,000 partitions (+ premake, default).
    counts = [x["partitions"] for x in cs["runs"]]
    assert 40 <= counts[0] <= 50 and 1000 <= counts[1] <= 1010, counts
    assert all(x["lock_held_ms"] > 0 for x in cs["runs"])

    assert len(data["targets"]) == 10  # with async capture / no capture
    assert all(_numeric(t["value"]) and isinstance(t["pass"], bool) for t in data["targets"])

    md = (out / "benchmarks.md").read_text()
    for heading in ("## Targets", "## 1. Backfill", "## 2. Dual-write", "## 3. Cutover", "## 4. Verification",
                    "## 5. Verify against the backfill"):
        assert heading in md
    assert data["postgres"]["version"].split()[0] in md
    assert md.count("The same copy split into the backfill's") == 2
    # Every target is rendered with its verdict.
    head = md.split("## 1. Backfill")[0].splitlines()
    rows = [ln for ln in head if ln.endswith(("| PASS |", "| MISS |"))]
    assert len(rows) == len(data["targets"]), rows


def test_bench_decoding_quick_measures_every_mode(tmp_path):
    """`bench --decoding`: the change log and logical decoding (a slot), replay included, on
    one server; every mode ran, and the consumers caught up before the next run."""
    from orchestrator.lab.bench_decoding import MODES

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["bench", "--decoding", "--quick", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "benchmarks-decoding.json").read_text())
    assert sorted(r["mode"] for r in data["runs"]) == sorted(MODES)
    for r in data["runs"]:
        assert r["tps"] > 0 and 0 < r["sustained_tps"] <= r["tps"] and r["catch_up_s"] >= 0, r
    assert data["ratio_tps"]["without"] == 1.0 and data["postgres"]
    md = (out / "benchmarks-decoding.md").read_text()
    assert all(f"| {m} |" in md for m in MODES)
