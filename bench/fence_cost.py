"""What the move fence costs an insert: pgbench of the same row through four statements, one server.

    python -m bench.fence_cost [--clients 8] [--rounds 5] [--duration 4]

On one PostgreSQL server (temporary, under /dev/shm, fsync and synchronous_commit on, as `make bench`),
each round runs, in turn:

- `plain`: `INSERT ... VALUES` of the row, nothing else;
- `unguarded`: the service's INSERT (server.storage.messages) without its fence guard;
- `service`: the service's INSERT as it is (the guard: server.storage.fences.write_guard);
- `earlier`: the service's INSERT with the guard of earlier versions, `<table>_writable` (plpgsql,
  the bucket's shared advisory lock, then a fresh snapshot), which the schema keeps for them.

Throughputs and PostgreSQL's CPU per insert (all its processes, WAL writer included) are medians
over rounds; the ratios to `plain` are taken within each round (the machine is
shared: neighbouring runs see the same load), then the median of those is shown. The last line is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
from typing import Any

import psycopg

from bench.loadgen import pgbench_binary, run_pgbench
from bench.procs import cpu_seconds, pgbench_login, postmaster_pids, scratch_dir, start_postgres
from bench.workload import dialogs_per_shard, pgbench_scripts, pgbench_variables, plain_insert_script
from server.storage.fences import params_unit, write_guard
from server.storage.schema import migrate_shard

TABLE = "messages_0"
#: The statements measured, in the order each round runs them.
KINDS = ("plain", "unguarded", "service", "earlier")


def scripts(table: str) -> dict[str, str]:
    """The pgbench script of each kind (pgbench's `:var` syntax, one line each)."""
    service, _page, _source = pgbench_scripts(table)
    guard = " ".join(write_guard(table, params_unit(":bucket", ":low", ":high")).split())
    if guard not in service:
        raise RuntimeError("the service's INSERT has no fence guard where bench.fence_cost looks for it")
    return {
        "plain": plain_insert_script(table),
        "unguarded": service.replace(guard, "true"),
        "service": service,
        "earlier": service.replace(guard, f"{table}_writable(:bucket, :low, :high)"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fence_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; figures are medians (default 5)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run (default 4)")
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
        dialog = dialogs_per_shard(1, 1_000_000_000)[0]
        variables, _select = pgbench_variables(dialog, 50)
        parts = pgbench_login(server)
        by_kind = scripts(TABLE)
        rounds: list[dict[str, float]] = []
        cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for index in range(args.rounds):
            this_round: dict[str, float] = {}
            for kind in KINDS:
                before = cpu_seconds(postmaster_pids([server]))
                m = run_pgbench(pgbench, parts, by_kind[kind], variables, args.clients, args.duration, tmp)
                used = cpu_seconds(postmaster_pids([server])) - before
                cpu[kind].append(used / max(1, m.succeeded) * 1e6)
                this_round[kind] = m.rps
                print(
                    f"round {index + 1}/{args.rounds}: {kind:<10}{m.rps:>10,.0f} tps"
                    f"{cpu[kind][-1]:>8.0f} µs of PostgreSQL CPU per insert",
                    file=sys.stderr,
                )
            rounds.append(this_round)
    result: dict[str, Any] = {
        "benchmark": "dialog-shard bench.fence_cost",
        "settings": {"clients": args.clients, "rounds": args.rounds, "duration_s": args.duration},
        "tps": {k: round(statistics.median(r[k] for r in rounds)) for k in KINDS},
        "over_plain": {
            k: round(statistics.median(r[k] / r["plain"] for r in rounds), 3) for k in KINDS if k != "plain"
        },
        "postgres_cpu_us_per_insert": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
        "rounds": [{k: round(v) for k, v in r.items()} for r in rounds],
    }
    print(f"pgbench INSERT of one row, {args.clients} clients, median of {args.rounds} rounds:")
    for kind in KINDS:
        ratio = result["over_plain"].get(kind)
        share = "" if ratio is None else f", {ratio:.3f} of plain"
        print(
            f"  {kind:<10}{result['tps'][kind]:>10,} tps{share}; "
            f"{result['postgres_cpu_us_per_insert'][kind]:.0f} µs of PostgreSQL CPU per insert"
        )
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
