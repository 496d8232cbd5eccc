"""`dialog-server --workers N`: N server processes sharing one port, and the parent supervising them.

One Python process saturates one core in gRPC and asyncio machinery long before PostgreSQL is
busy, so a host with several cores runs several worker processes. Each worker is a complete
server (its own pools, shard-map mirror kept current by LISTEN/NOTIFY) bound to the same address
with SO_REUSEPORT; the kernel spreads incoming connections across them. The per-user rate limits are
the host's, not each worker's: the parent creates their tables (server.interceptors.shared_buckets)
and every worker maps them (`--shared-limits`).

The parent reserves the address first: it checks that nothing is bound there (a bind without
SO_REUSEPORT fails if anything is), then keeps a bound, non-listening SO_REUSEPORT socket for its
whole life. Workers can join that port; another server started by mistake on the same address
cannot, whatever its own options (a single-worker server never sets SO_REUSEPORT at all).

Lifetime: the parent starts the workers (each in its own session, so a terminal's Ctrl-C reaches
only the parent), waits until every one is serving, and on SIGTERM or SIGINT forwards SIGTERM to
all of them, waits for their drain and exits 0. A worker that exits on its own fails the whole
server fast: the parent stops the others and exits non-zero, so the process manager above it
(systemd, Kubernetes) restarts the server with its own back-off and alerting, instead of a
silently half-sized server restarting a crashing worker in a loop. A worker whose parent is gone
(killed with SIGKILL) stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.errors import StartupError

#: Hidden `dialog-server` option that makes a process a worker of the given parent pid.
WORKER_FLAG = "--worker-of"
#: Hidden `dialog-server` option giving a worker its index (0..N-1); worker i serves metrics on port + i.
WORKER_INDEX_FLAG = "--worker-index"
#: Hidden `dialog-server` option naming the directory of the rate-limit tables the workers share.
SHARED_LIMITS_FLAG = "--shared-limits"
#: What a worker prints (instead of the usual banner) once it serves.
READY_LINE = "dialog-shard worker ready"
#: How every server process announces its metrics endpoint (prefixed with the worker's index here).
METRICS_LINE = "metrics on "
#: Seconds a worker has to start serving.
START_TIMEOUT_SECONDS = 60.0
#: Seconds past the drain grace period before a worker that has not exited is killed.
KILL_MARGIN_SECONDS = 5.0


class ListenError(StartupError, OSError):
    """The listen address cannot be bound (by the supervisor or a lone server); the message says why."""


def split_listen(listen: str) -> tuple[str, int]:
    """Host and port of a `host:port` listen address (`[::1]:50051` too)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ListenError(f"cannot listen on {listen}: expected host:port")
    return host.strip("[]"), int(port)


def reserve_port(listen: str) -> tuple[list[socket.socket], int]:
    """Bound SO_REUSEPORT sockets holding the address for the workers, and the port (0 resolved).

    Fails if any socket is bound to the address already: workers must never silently share a
    port with another server.
    """
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {listen}: {exc.strerror}") from None
    held: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            with socket.socket(family, kind, proto) as probe:
                # Without SO_REUSEPORT this bind fails if any socket holds the address.
                probe.bind((address[0], port, *address[2:]))
                port = probe.getsockname()[1]
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address[0], port, *address[2:]))
    except OSError as exc:
        for sock in held:
            sock.close()
        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return held, port


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Starts `workers` copies of `worker_argv` on one reserved address and watches them."""

    def __init__(
        self, worker_argv: Sequence[str], *, workers: int, listen: str, grace_seconds: float
    ) -> None:
        self._argv = list(worker_argv)
        self._count = workers
        self._listen = listen
        self._grace = grace_seconds
        self._workers: list[_Worker] = []
        self._stop = asyncio.Event()

    async def run(self, on_serving: Sequence[str] = (), on_ready: Callable[[], None] = lambda: None) -> int:
        """Serve until SIGTERM/SIGINT (exit code 0) or a worker's exit (its code, at least 1).

        `on_ready` runs once every worker serves (and so has opened whatever it was handed).
        """
        sockets, port = reserve_port(self._listen)
        host = self._listen.rpartition(":")[0]
        address = f"{host}:{port}"
        print(f"starting {self._count} worker processes on {address}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            for index in range(self._count):
                await self._spawn(index, address)
            failed = await self._wait_ready()
            if failed is None:
                on_ready()
                print(
                    f"dialog-shard serving on {address} with {self._count} worker processes "
                    f"(pids {', '.join(str(w.pid) for w in self._workers)})",
                    flush=True,
                )
                for line in on_serving:
                    print(line.replace("{address}", address), flush=True)
                failed = await self._watch()
            if failed is None:
                print(f"shutting down: draining in-flight calls in {self._count} workers", flush=True)
            await self._stop_all()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            for sock in sockets:
                sock.close()
        if failed is None:
            return 0
        code = failed.process.returncode
        print(
            f"dialog-server: worker {failed.index} (pid {failed.pid}) exited with {_describe(code)}; "
            "stopped the other workers",
            file=sys.stderr,
            flush=True,
        )
        return code if code is not None and code > 0 else 1

    async def _spawn(self, index: int, address: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._argv,
            "--listen",
            address,
            WORKER_FLAG,
            str(os.getpid()),
            WORKER_INDEX_FLAG,
            str(index),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        worker = _Worker(index, process)
        self._workers.append(worker)
        asyncio.get_running_loop().create_task(self._forward(worker))

    async def _forward(self, worker: _Worker) -> None:
        """Copy a worker's stdout to ours; its ready line marks it serving."""
        assert worker.process.stdout is not None
        async for raw in worker.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(READY_LINE):
                worker.ready.set()
                line = f"worker {worker.index} (pid {worker.pid}) serving"
            elif line.startswith(METRICS_LINE):
                line = f"worker {worker.index} (pid {worker.pid}) {line}"
            print(line, flush=True)

    async def _wait_ready(self) -> _Worker | None:
        """None when every worker serves; the first worker that exited (or hung) otherwise."""
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
        while not all(w.ready.is_set() for w in self._workers):
            exited = next((w for w in self._workers if w.process.returncode is not None), None)
            if exited is not None:
                return exited
            if self._stop.is_set():
                return None
            if asyncio.get_running_loop().time() > deadline:
                slow = next(w for w in self._workers if not w.ready.is_set())
                print(f"dialog-server: worker {slow.index} did not serve within {START_TIMEOUT_SECONDS:.0f}s")
                return slow
            await asyncio.sleep(0.05)
        return None

    async def _watch(self) -> _Worker | None:
        """Wait for a stop signal (None) or the first worker to exit (that worker)."""
        waits = {asyncio.ensure_future(w.process.wait()): w for w in self._workers}
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            for wait in waits:
                wait.cancel()
        if stop in done and not any(w in done for w in waits):
            return None
        return next(waits[w] for w in waits if w in done)

    async def _stop_all(self) -> None:
        """SIGTERM every worker, wait for the drain, SIGKILL what is left after the grace period."""
        for worker in self._workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(w.process.wait()) for w in self._workers]
        _, pending = await asyncio.wait(waits, timeout=self._grace + KILL_MARGIN_SECONDS)
        for worker in self._workers:
            if worker.process.returncode is None:
                print(f"dialog-server: worker {worker.index} did not drain in time; killing it", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
        if pending:
            await asyncio.wait(pending)


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


async def watch_parent(parent_pid: int, stop: asyncio.Event, interval: float = 1.0) -> None:
    """In a worker: set `stop` once the supervising parent is gone (e.g. killed with SIGKILL)."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            print("dialog-server: the supervising process is gone; stopping", file=sys.stderr, flush=True)
            stop.set()
            return
        await asyncio.sleep(interval)
