"""What the move fence costs PostgreSQL: pgbench of one INSERT and one page read, with and without it.

    python -m bench.fence_cost [--clients 8] [--rounds 5] [--duration 4]

On one PostgreSQL server (temporary, under /dev/shm, fsync and synchronous_commit on, as `make bench`),
each round runs the INSERT of one row as

- `plain`: `INSERT ... VALUES` of the row, nothing else;
- `unguarded`: the service's INSERT (server.storage.messages) without its fence guard;
- `service`: the service's INSERT as it is (the guard: server.storage.fences.write_guard);
- `earlier`: the service's INSERT with the guard of earlier versions, `<table>_writable` (plpgsql,
  the bucket's shared advisory lock, then a fresh snapshot), which the schema keeps for them;

and, after every INSERT round and a VACUUM (ANALYZE), each round reads the newest page of 50 of a
2,000-message dialog as `page_unguarded`, `page` (the service's, server.storage.fences.read_guard)
and `page_earlier` (with `<table>_readable`, plpgsql). Each round starts at another kind.

Throughputs and PostgreSQL's CPU per statement (all its processes, WAL writer included) are medians
over rounds; the ratios (to `plain`, or to `page_unguarded`) are taken within each round (the machine
is shared: neighbouring runs see the same load), then the median of those is shown. The last line is
one JSON object with every figure, also written to bench-results/fence-<YYYYmmddTHHMMSS>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import psycopg

from bench.loadgen import pgbench_binary, run_pgbench
from bench.procs import REPO, cpu_seconds, pgbench_login, postmaster_pids, scratch_dir, start_postgres
from bench.workload import (
    dialogs_per_shard,
    pgbench_scripts,
    pgbench_variables,
    plain_insert_script,
    seed_dialog,
    settle_after_load,
)
from server.storage.fences import params_unit, read_guard, write_guard
from server.storage.schema import migrate_shard

TABLE = "messages_0"
#: The statements measured, in the order each round runs them, and what each is compared with.
BASELINES = {
    "plain": "plain",
    "unguarded": "plain",
    "service": "plain",
    "earlier": "plain",
    "page_unguarded": "page_unguarded",
    "page": "page_unguarded",
    "page_earlier": "page_unguarded",
}
INSERTS = ("plain", "unguarded", "service", "earlier")
PAGES = ("page_unguarded", "page", "page_earlier")
PAGE_SIZE = 50


def scripts(table: str) -> dict[str, str]:
    """The pgbench script of each kind (pgbench's `:var` syntax, one line each)."""
    insert, page, _source = pgbench_scripts(table)
    unit = params_unit(":bucket", ":low", ":high")
    guards = (write_guard(table, unit), read_guard(table, ":bucket", ":low", ":high"))
    writes, reads = (" ".join(guard.split()) for guard in guards)
    if writes not in insert or reads not in page:
        raise RuntimeError("the service's statements have no fence guard where bench.fence_cost looks")
    return {
        "plain": plain_insert_script(table),
        "unguarded": insert.replace(writes, "true"),
        "service": insert,
        "earlier": insert.replace(writes, f"{table}_writable(:bucket, :low, :high)"),
        "page_unguarded": page.replace(reads, "true"),
        "page": page,
        "page_earlier": page.replace(reads, f"(SELECT {table}_readable(:bucket, :low, :high))"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fence_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; figures are medians (default 5)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run (default 4)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "bench-results")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        tmp = scratch_dir("dialog-fence-cost-", stack)
        (server,) = start_postgres(tmp, 1, stack, {"synchronous_commit": "on", "fsync": "on"})
        pgbench = pgbench_binary(server.bin_dir)
        if pgbench is None:
            raise SystemExit("pgbench not found next to the PostgreSQL binaries or on PATH")

        async def migrate() -> None:
            async with await psycopg.AsyncConnection.connect(server.dsn, autocommit=True) as conn:
                await migrate_shard(conn, TABLE)

        asyncio.run(migrate())
        writer, reader = dialogs_per_shard(1, 1_000_000_000)[0], dialogs_per_shard(1, 1_100_000_000)[0]
        seed_dialog(server.dsn, TABLE, reader, 2_000)
        variables = {
            "insert": pgbench_variables(writer, PAGE_SIZE)[0],
            "page": pgbench_variables(reader, PAGE_SIZE)[1],
        }
        by_kind = scripts(TABLE)
        rounds: list[dict[str, float]] = [{} for _ in range(args.rounds)]
        cpu: dict[str, list[float]] = {kind: [] for kind in BASELINES}
        # The inserts' rounds first; the pages' on the table settled after them (autovacuum's pass
        # over the new rows would otherwise land in some page runs). Each round starts its kinds at
        # another one, so no kind always runs right after the same neighbour.
        for group in (INSERTS, PAGES):
            if group is PAGES:
                settle_after_load(server.dsn, TABLE)
            for index in range(args.rounds):
                for kind in group[index % len(group) :] + group[: index % len(group)]:
                    before = cpu_seconds(postmaster_pids([server]))
                    m = run_pgbench(
                        pgbench,
                        pgbench_login(server),
                        by_kind[kind],
                        variables["page" if group is PAGES else "insert"],
                        args.clients,
                        args.duration,
                        tmp,
                    )
                    used = cpu_seconds(postmaster_pids([server])) - before
                    cpu[kind].append(used / max(1, m.succeeded) * 1e6)
                    rounds[index][kind] = m.rps
                    print(
                        f"round {index + 1}/{args.rounds}: {kind:<15}{m.rps:>10,.0f} tps"
                        f"{cpu[kind][-1]:>8.0f} µs of PostgreSQL CPU per statement",
                        file=sys.stderr,
                    )
    result: dict[str, Any] = {
        "benchmark": "dialog-shard bench.fence_cost",
        "settings": {"clients": args.clients, "rounds": args.rounds, "duration_s": args.duration},
        "tps": {k: round(statistics.median(r[k] for r in rounds)) for k in BASELINES},
        "ratio_to_baseline": {
            k: round(statistics.median(r[k] / r[base] for r in rounds), 3)
            for k, base in BASELINES.items()
            if k != base
        },
        "postgres_cpu_us_per_statement": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
        "rounds": [{k: round(v) for k, v in r.items()} for r in rounds],
    }
    print(f"pgbench, {args.clients} clients, median of {args.rounds} rounds:")
    for kind, base in BASELINES.items():
        ratio = result["ratio_to_baseline"].get(kind)
        share = "" if ratio is None else f", {ratio:.3f} of {base}"
        print(
            f"  {kind:<15}{result['tps'][kind]:>10,} tps{share}; "
            f"{result['postgres_cpu_us_per_statement'][kind]:.0f} µs of PostgreSQL CPU per statement"
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"fence-{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
