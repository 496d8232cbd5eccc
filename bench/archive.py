"""Benchmark of the archive: bytes per message in PostgreSQL against the archive's Parquet files,
the archive rate, and GetDialog latency of a hot page against the first and a deep archived page.

    python -m bench.archive                    # 2,000 dialogs x 100 messages + one of 20,000 (~1 min)
    python -m bench.archive --pairs 500 --deep 5000

Starts one PostgreSQL server under /dev/shm (fsync on) with the seed's four shard tables side by
side, an in-process dialog-server on it, and an archive in a local directory. Seeds messages of
synthetic chat text (a seeded generator: short replies, sentences of common words, numbers, some
emoji and links), sent 60 days ago, straight into the shards, plus a few hundred recent messages
in the deep dialog. Measures the shards' heap + TOAST and index bytes per message (after VACUUM),
archives everything older than 30 days (`Archiver.run`, as `dialogctl archive` does), and reports
the files' bytes per message, messages/s, and the latency (p50/p99 over `--calls` calls, one at a
time) of: the deep dialog's newest page (hot), its oldest page (the archive's first page), and a
page in the middle of its archived messages; plus the row groups such a deep page reads. Not a
test: nothing is asserted about time; the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench.procs import REPO, scratch_dir, start_postgres
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.archive.reader import ArchiveReader
from server.archive.store import ArchiveStore
from server.auth import issue_token
from server.config import ServerConfig, config_from_mapping
from server.moves.archiver import Archiver
from server.routing import Pair, bucket_of, calculate_shard
from server.runtime.app import running_server

_WORD_TEXT = (
    "i you the a to it and is that in of what for me on be have so just do we not my this no yes ok "
    "are was can will at know like get but all your with up go if about now out too see there how "
    "good think then one time really when here want did going would got right u they well back lol "
    "today tomorrow tonight later sure thanks thank love call home work meeting lunch dinner coffee "
    "sounds great nice haha omg wait where why who need come let's maybe also still already soon "
    "weekend friday monday morning night late early send sent photo pic link check please sorry "
    "miss happy birthday train bus car traffic minutes hour hours leave leaving here's done ready"
)
_WORDS = _WORD_TEXT.split()
_REPLIES = ("ok", "k", "lol", "yes", "no", "sure", "thanks!", "haha", "👍", "on my way", "ok 👌", "np", "❤️")
_EMOJI = ("😂", "🙂", "👍", "❤️", "🎉", "😅", "🙏", "😎")


def chat_text(rng: random.Random) -> str:
    """One synthetic chat message: a third are short replies, the rest sentences of common words."""
    if rng.random() < 0.3:
        return rng.choice(_REPLIES)
    words = [rng.choice(_WORDS) for _ in range(max(1, int(rng.lognormvariate(2.0, 0.7))))]
    if rng.random() < 0.1:
        words.insert(rng.randrange(len(words) + 1), str(rng.randrange(1, 100)))
    if rng.random() < 0.04:
        words.append(f"https://example.com/{secrets.token_urlsafe(8)}")
    text = " ".join(words)
    text = text[0].upper() + text[1:] + rng.choice(("", "", ".", "?", "!"))
    if rng.random() < 0.15:
        text += " " + rng.choice(_EMOJI)
    return text


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.archive", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="seeded dialogs (default 2,000)")
    parser.add_argument("--per-pair", type=int, default=100, help="messages per dialog (default 100)")
    parser.add_argument(
        "--deep", type=int, default=20_000, help="messages of the deep dialog (default 20,000)"
    )
    parser.add_argument("--calls", type=int, default=300, help="GetDialog calls per measured page")
    parser.add_argument("--page-size", type=int, default=50)
    return parser.parse_args(argv)


def _message_id(moment_ms: int, rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=(moment_ms << 80) | (0x7 << 76) | (0b10 << 62) | rng.getrandbits(62))


def _seed(
    config: ServerConfig, dialogs: list[tuple[tuple[int, int], int, datetime]], rng: random.Random
) -> int:
    rows: dict[int, list[tuple[Any, ...]]] = {}
    total = 0
    for (a, b), count, sent in dialogs:
        low, high = Pair.of(a, b)
        start = int(sent.timestamp() * 1000)
        for i in range(count):
            message_id = _message_id(start + i * 37, rng)
            sender = a if rng.random() < 0.5 else b
            created = datetime.fromtimestamp((start + i * 37) / 1000, tz=UTC)
            rows.setdefault(calculate_shard(a, b, 4), []).append(
                (
                    message_id,
                    low,
                    high,
                    bucket_of(a, b),
                    sender,
                    b if sender == a else a,
                    chat_text(rng),
                    created,
                )
            )
            total += 1
    for shard_id, shard_rows in rows.items():
        shard = config.shards[shard_id]
        with psycopg.connect(shard.dsn) as conn, conn.cursor() as cur:
            columns = "message_id, user_low, user_high, bucket, from_user_id, to_user_id, text, created_at"
            with cur.copy(f"COPY {shard.table} ({columns}) FROM STDIN") as copy:
                for row in shard_rows:
                    copy.write_row(row)
    return total


def _sizes(config: ServerConfig) -> dict[str, int]:
    dsn = config.shards[0].dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        totals = {"table_bytes": 0, "index_bytes": 0, "messages": 0}
        for shard in config.shards:
            conn.execute(f"VACUUM ANALYZE {shard.table}")
            row = conn.execute(
                "SELECT pg_table_size(%s), pg_indexes_size(%s)", (shard.table, shard.table)
            ).fetchone()
            count = conn.execute(f"SELECT count(*) FROM {shard.table}").fetchone()
            assert row is not None and count is not None
            totals["table_bytes"] += int(row[0])
            totals["index_bytes"] += int(row[1])
            totals["messages"] += int(count[0])
    return totals


async def _latency(call: Any, calls: int) -> dict[str, float]:
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    return {
        "p50_ms": round(statistics.median(seconds) * 1000, 3),
        "p99_ms": round(seconds[int(len(seconds) * 0.99) - 1] * 1000, 3),
    }


async def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    stack = contextlib.ExitStack()
    with stack:
        [postgres] = start_postgres(root, 1, stack, {})
        postgres.create_database("bench")
        dsn = postgres.dsn_for("bench")
        secret = secrets.token_urlsafe(48)
        config = config_from_mapping(
            {
                "listen": "127.0.0.1:0",
                "shards": [{"id": i, "dsn": dsn, "table": f"messages_{i}"} for i in range(4)],
                "auth": {"jwt_secret": secret},
                "metrics": {"enabled": False},
                "log": {"rpc": False},
                "limits": {"send_rate_per_second": 0, "read_rate_per_second": 0},
                "archive": {"url": str(root / "archive"), "manifest_max_age": 1.0},
            },
            {},
            base_dir=REPO,
        )
        rng = random.Random(20261206)
        long_ago = datetime.now(UTC) - timedelta(days=60)
        deep = (rng.randrange(1, 2**62), rng.randrange(1, 2**62))
        dialogs = [
            ((rng.randrange(1, 2**62), rng.randrange(1, 2**62)), args.per_pair, long_ago)
            for _ in range(args.pairs)
        ]
        dialogs.append((deep, args.deep, long_ago))
        recent = datetime.now(UTC) - timedelta(hours=1)
        async with running_server(config) as running:
            seeded = _seed(config, dialogs, rng)
            hot_recent = _seed(config, [(deep, 4 * args.page_size, recent)], rng)
            before = _sizes(config)
            auth = (
                ("authorization", f"Bearer {issue_token(config.auth, user_id=deep[0], ttl_seconds=3600)}"),
            )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = dialog_service_pb2_grpc.DialogServiceStub(channel)

                def page(order: pb.MessageOrder.ValueType, token: str = "") -> Any:
                    request = pb.GetDialogRequest(
                        user_id=deep[0],
                        peer_user_id=deep[1],
                        page_size=args.page_size,
                        page_token=token,
                        order=order,
                    )
                    return lambda: stub.GetDialog(request, metadata=auth)

                async def token_at(depth: int) -> str:
                    token = ""
                    for _ in range(depth // 1000):
                        reply = await stub.GetDialog(
                            pb.GetDialogRequest(
                                user_id=deep[0],
                                peer_user_id=deep[1],
                                page_size=1000,
                                page_token=token,
                                order=pb.MESSAGE_ORDER_OLDEST_FIRST,
                            ),
                            metadata=auth,
                        )
                        token = reply.next_page_token
                    return token

                middle = (args.deep // 2000) * 1000
                hot_before = await _latency(page(pb.MESSAGE_ORDER_NEWEST_FIRST), args.calls)
                deep_before = await _latency(
                    page(pb.MESSAGE_ORDER_OLDEST_FIRST, await token_at(middle)), args.calls
                )
                store = ArchiveStore(str(root / "archive"))
                archiver = Archiver(
                    [running.shards.store(i) for i in range(4)], config.control_dsn, store, config.archive
                )
                started = time.perf_counter()
                report = await archiver.run(datetime.now(UTC) - timedelta(days=30))
                archive_seconds = time.perf_counter() - started
                # The run waits once for the servers' manifest age before deleting: not work.
                lease_wait = config.archive.manifest_max_age + 1.0
                after = _sizes(config)
                hot_after = await _latency(page(pb.MESSAGE_ORDER_NEWEST_FIRST), args.calls)
                first_archived = await _latency(page(pb.MESSAGE_ORDER_OLDEST_FIRST), args.calls)
                deep_token = await token_at(middle)
                deep_archived = await _latency(page(pb.MESSAGE_ORDER_OLDEST_FIRST, deep_token), args.calls)
                reader = ArchiveReader(store, max_age=60)
                await reader.page(Pair.of(*deep), after=None, oldest_first=True, limit=1)
                groups_before = reader.stats.row_groups
                probe = await stub.GetDialog(
                    pb.GetDialogRequest(
                        user_id=deep[0],
                        peer_user_id=deep[1],
                        page_size=1000,
                        page_token=deep_token,
                        order=pb.MESSAGE_ORDER_OLDEST_FIRST,
                    ),
                    metadata=auth,
                )
                cursor = probe.messages[0].message_id
                await reader.page(Pair.of(*deep), after=cursor, oldest_first=True, limit=args.page_size)
                groups_per_deep_page = reader.stats.row_groups - groups_before
        archived = report.total
        return {
            "machine": "2-core shared development machine (see docs/performance.md)",
            "seeded_messages": seeded + hot_recent,
            "archived_messages": archived,
            "postgres_bytes_per_message": {
                "table": round(before["table_bytes"] / before["messages"], 1),
                "indexes": round(before["index_bytes"] / before["messages"], 1),
                "total": round((before["table_bytes"] + before["index_bytes"]) / before["messages"], 1),
            },
            "archive_bytes_per_message": round(report.bytes / archived, 1),
            "archive_files": report.files,
            "postgres_after_archive_bytes": after["table_bytes"] + after["index_bytes"],
            "archive_seconds": round(archive_seconds, 2),
            "archive_messages_per_second": round(archived / max(archive_seconds - lease_wait, 1e-9)),
            "page_size": args.page_size,
            "hot_newest_page_before_archive": hot_before,
            "deep_page_before_archive": deep_before,
            "hot_newest_page_after_archive": hot_after,
            "first_archived_page": first_archived,
            "deep_archived_page": deep_archived,
            "row_groups_per_deep_archived_page": groups_per_deep_page,
        }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with contextlib.ExitStack() as stack:
        root = scratch_dir("bench-archive-", stack)
        results = asyncio.run(_run(args, root))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    out = REPO / "bench-results" / f"archive-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"written to {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
