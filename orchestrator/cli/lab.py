"""The lab's verbs: ``orchestrate demo`` and ``orchestrate bench`` (orchestrator.lab does the work)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from orchestrator.cli.common import handled
from orchestrator.cli.report import ProgressPrinter


@click.command("demo")
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
        from orchestrator.lab import demo_distributed as demo
    else:
        from orchestrator.lab import demo
    demo.run(rows=rows, days=days, clients=clients, keep=keep, progress=lambda: ProgressPrinter(interval_s=2.0))


@click.command("bench")
@click.option("--rows", type=click.IntRange(1000), default=None, help="Rows in the table (default 1,000,000; "
              "--quick 50,000). The verify/RSS scaling run uses 5x (--quick: 2x).")
@click.option("--quick", is_flag=True, help="Small and short: well under a minute (writes to a temp dir "
              "unless --output-dir is given).")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Where benchmarks.json and benchmarks.md go (default ./docs; --quick: a temp dir).")
@click.option("--pg-bin", default=None, help="PostgreSQL bin directory (or 'system', '15', 'embedded').")
@click.option("--distributed", is_flag=True, help="Instead: on a local Citus cluster, the distributed migration "
              "against our migration followed by create_distributed_table_concurrently (wall time, longest "
              "write); writes benchmarks-distributed.json/.md (default ./docs; --quick: only printed).")
@click.option("--decoding", is_flag=True, help="Instead: async capture's change log against logical decoding "
              "(a slot), replay included, pgbench side by side; writes benchmarks-decoding.json/.md "
              "(default ./docs; --quick: small, only printed).")
@handled
def bench_cmd(rows: int | None, quick: bool, output_dir: str | None, pg_bin: str | None,
              distributed: bool = False, decoding: bool = False) -> None:
    """Measure backfill speed, dual-write overhead, cutover lock and memory, side by side."""
    if decoding:
        from orchestrator.lab import bench_decoding

        res = bench_decoding.compare(rows or (20_000 if quick else 200_000), seconds=2.0 if quick else 10.0,
                                     rounds=1 if quick else 3, pg_bin=pg_bin, say=lambda s: click.echo(s, err=True))
        out = Path(output_dir) if output_dir else (None if quick else Path("docs"))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "benchmarks-decoding.json").write_text(json.dumps(res, indent=2) + "\n")
            (out / "benchmarks-decoding.md").write_text(bench_decoding.render_markdown(res))
        for m in bench_decoding.MODES:
            click.echo(f"{m:<8} {res['ratio_tps'][m]:.2f}x of no capture while pgbench ran, "
                       f"{res['ratio_sustained_tps'][m]:.2f}x sustained (catching up included)")
        return
    if distributed:
        from orchestrator.lab.bench_citus import LABELS, compare, render_markdown

        res = compare(rows or (20_000 if quick else 200_000), say=lambda s: click.echo(s, err=True))
        out = Path(output_dir) if output_dir else (None if quick else Path("docs"))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "benchmarks-distributed.json").write_text(json.dumps(res, indent=2) + "\n")
            (out / "benchmarks-distributed.md").write_text(render_markdown(res))
        for mode, label in LABELS:
            r = res[mode]
            click.echo(f"{label:<52} wall {r['wall_s']:>7.1f}s  longest write {r['longest_write_ms']:>8.1f} ms  "
                       f"errors {r['errors']}" + (f"  (concurrently refused: {r['concurrently_error']}; "
                                                  f"then {r['second_step']})" if "concurrently_error" in r else ""))
        if out is not None:
            click.echo(f"wrote {out / 'benchmarks-distributed.json'}, {out / 'benchmarks-distributed.md'}")
        return
    from orchestrator.lab.bench import run_bench, verdict

    rows = rows or (50_000 if quick else 1_000_000)
    results = run_bench(rows, quick, Path(output_dir) if output_dir else None, pg_bin=pg_bin,
                        say=lambda s: click.echo(s, err=True))
    for t in results["targets"]:
        val = f"{t['value']:.2f}x" if "/" in t["name"] else f"{t['value']:.1f}"
        click.echo(f"{verdict(t['pass']):4}  {t['name']}: {val} (target {t['target']})")
    click.echo(f"wrote {', '.join(results['_outputs'])} in {results['duration_s']:.0f} s")


commands = [demo_cmd, bench_cmd]
