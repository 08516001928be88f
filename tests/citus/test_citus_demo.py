"""`orchestrate demo --distributed` runs end to end on its own Citus cluster and exits 0
only when the distributed twin equals the workload's golden record and rows sit on both
workers."""

from __future__ import annotations

import re

from helpers import run_cli


def test_demo_distributed(citus):  # the session cluster proves Citus is installed (or fails naming the fix)
    rc, out, err = run_cli("demo", "--distributed", "--rows", "3000", "--days", "30", "--clients", "2",
                           timeout=600)
    assert rc == 0, out + err
    assert "distributed twin == what the workload committed: yes" in out
    assert re.search(r"writes during the migration\s+[\d,]+ committed, 0 errors", out), out
    workers = re.findall(r"worker 127\.0\.0\.1:\d+\s+([\d,]+) rows", out)
    assert len(workers) == 2 and all(int(n.replace(",", "")) > 0 for n in workers), out
