"""Soak: a few minutes of steady mixed load on a real server process; no errors, no resource growth.

Slow (excluded from `make test`); run it with
    .venv/bin/pytest -m slow -s tests/test_soak.py            # 180 s
    DIALOG_SOAK_SECONDS=600 .venv/bin/pytest -m slow -s tests/test_soak.py
It prints the server's resident memory and open file descriptors (gRPC and PostgreSQL sockets)
sampled over the run, and checks that after warm-up neither grows.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path

import grpc
import pytest

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.auth import issue_token
from server.config import ServerConfig
from tests.faults import fault_server_config, pairs_on, rng, start_server_process
from tests.pgfixtures import free_port

SECONDS = float(os.environ.get("DIALOG_SOAK_SECONDS", "180"))
WORKERS = 8
SAMPLE_EVERY = 5.0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
async def test_soak_steady_load_without_errors_or_growth(
    tmp_path: Path, cluster_config: ServerConfig, jwt_secret: str
) -> None:
    port = free_port()
    proc = await start_server_process(
        fault_server_config(tmp_path / "soak.toml", cluster_config, port, jwt_secret, 10)
    )
    pairs = [
        p for s in range(cluster_config.num_shards) for p in pairs_on(s, cluster_config.num_shards, 2, rng)
    ]
    counts = {"send": 0, "read": 0}
    errors: list[str] = []
    latencies: list[float] = []
    samples: list[tuple[float, int, int]] = []
    stop = asyncio.Event()

    async def worker(index: int, stub: dialog_service_pb2_grpc.DialogServiceAsyncStub) -> None:
        sender, peer = pairs[index % len(pairs)]
        metadata = (("authorization", f"Bearer {issue_token(cluster_config.auth, user_id=sender)}"),)
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                if n % 4:
                    await stub.SendMessage(
                        pb.SendMessageRequest(
                            from_user_id=sender,
                            to_user_id=peer,
                            text=f"soak {n}",
                            request_id=f"soak-{index}-{n}",
                        ),
                        metadata=metadata,
                        timeout=5,
                    )
                    counts["send"] += 1
                else:
                    await stub.GetDialog(
                        pb.GetDialogRequest(user_id=sender, peer_user_id=peer, page_size=50),
                        metadata=metadata,
                        timeout=5,
                    )
                    counts["read"] += 1
                latencies.append(time.monotonic() - started)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

    async def sampler() -> None:
        began = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - began, _rss_kib(proc.pid), _fds(proc.pid)))
            await asyncio.sleep(SAMPLE_EVERY)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
            tasks = [asyncio.create_task(worker(i, stub)) for i in range(WORKERS)]
            tasks.append(asyncio.create_task(sampler()))
            await asyncio.sleep(SECONDS)
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            # The log's last lines (shutdown steps log their durations) say where it stopped.
            tail = (tmp_path / "soak.log").read_text(errors="replace").splitlines()[-15:]
            message = "dialog-server did not exit within 30 s of SIGTERM; its log ends:\n" + "\n".join(tail)
            raise AssertionError(message) from None
        assert exit_code == 0

    warm = [s for s in samples if s[0] >= SECONDS * 0.25]
    print(
        f"soak {SECONDS:.0f}s, {WORKERS} callers: {counts['send']} sends, {counts['read']} reads, "
        f"{len(errors)} errors; latency median {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {statistics.quantiles(latencies, n=100)[98] * 1000:.1f} ms"
    )
    print("t(s)  RSS(MiB)  fds: " + ", ".join(f"{t:.0f} {rss / 1024:.1f} {fds}" for t, rss, fds in samples))
    assert not errors, errors[:5]
    assert len(warm) >= 3
    first_rss, last_rss = warm[0][1], warm[-1][1]
    # Noise allowance of 10% (allocator arenas, gRPC buffers); a leak per call would exceed it.
    assert last_rss <= first_rss * 1.10, f"server RSS grew from {first_rss} KiB to {last_rss} KiB"
    assert max(s[2] for s in warm) - min(s[2] for s in warm) <= 4, f"open descriptors varied: {warm}"
