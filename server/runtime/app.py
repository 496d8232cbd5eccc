"""Wiring: the server's whole lifetime as one async context manager.

Order on the way up: shard pools (with schema; unreachable shards start
unavailable unless all are required) and their monitors -> control pool and
shard-map mirror -> gRPC server (servicers, health, reflection) -> metrics
endpoint -> health from shard state. On the way down, the reverse: NOT_SERVING
-> stop accepting (new calls get UNAVAILABLE) and drain in-flight RPCs within
the grace period -> metrics endpoint -> close the mirror, the monitors and the
pools.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.gen.dialog.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    dialog_service_pb2,
    dialog_service_pb2_grpc,
)
from server.archive.reader import ArchiveReader
from server.archive.store import configured_store
from server.auth import TokenVerifier
from server.config import MAX_SEND_BYTES, ArchiveConfig, ConfigError, LimitsConfig, ServerConfig, TlsConfig
from server.delivery import DeliveryHub
from server.interceptors import (
    AuthInterceptor,
    ConcurrencyLimitInterceptor,
    DeadlineInterceptor,
    ErrorMappingInterceptor,
    FusedInterceptors,
    RateLimitInterceptor,
)
from server.interceptors._wrap import CallInterceptor
from server.interceptors.observe import ObserveInterceptor
from server.interceptors.rate_limit import Limiter, TokenBucketLimiter
from server.interceptors.shared_buckets import SharedTokenBuckets, table_path
from server.moves.archiver import Archiver, ArchiveSchedule
from server.moves.rebalancer import Rebalancer
from server.moves.resumer import MoveResumer
from server.observability.activity import ActivityFlusher, ActivityRecorder
from server.observability.logs import RpcLog
from server.observability.metrics import MetricsEndpoint, ServerMetrics
from server.pagination import PageTokenCodec
from server.placement import Placement
from server.runtime.supervisor import ListenError
from server.services.admin import AdminService
from server.services.dialog import DialogService
from server.services.health import ShardHealthReporter
from server.storage.inbox import InboxStore, inbox_layout
from server.storage.pools import ShardSet

log = logging.getLogger(__name__)

#: Calls gRPC admits beyond the services' cap: health checks and reflection, which it leaves out.
_UNCAPPED_CALLS = 32
DIALOG_SERVICE = dialog_service_pb2.DESCRIPTOR.services_by_name["DialogService"].full_name
ADMIN_SERVICE = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SEND_MESSAGE_METHOD = f"/{DIALOG_SERVICE}/SendMessage"
#: DialogService's write methods, under the per-user send limit.
WRITE_METHODS = frozenset({SEND_MESSAGE_METHOD, f"/{DIALOG_SERVICE}/DeleteMessage"})
#: DialogService's read methods, under the per-user read limit (a subscription counts as one read).
READ_METHODS = frozenset(
    {f"/{DIALOG_SERVICE}/{name}" for name in ("GetDialog", "SubscribeMessages", "ListDialogs")}
)
#: The rate limits by name (their shared tables' names): rate, burst, limited methods.
RATE_LIMITS = ("send", "read")


@dataclass(frozen=True, slots=True)
class RunningServer:
    """A started server: the port it listens on and the parts tests and tools inspect."""

    server: grpc.aio.Server
    port: int
    placement: Placement
    shards: ShardSet
    health: health.aio.HealthServicer
    #: The metrics endpoint's port (None: metrics disabled).
    metrics_port: int | None = None
    #: The flusher of this process's recent-activity counts (tests flush it on demand).
    activity: ActivityFlusher | None = None
    #: The automatic rebalancer (None: `[rebalance] auto` is off).
    rebalancer: Rebalancer | None = None
    #: Live delivery (SubscribeMessages) in this process.
    delivery: DeliveryHub | None = None


def _connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's max connection age: after it (+-10% jitter), a GOAWAY sends clients to a new
    connection, which SO_REUSEPORT hashes to a worker anew; calls in flight get the shutdown
    grace to finish. gRPC clients reconnect on their own; calls are not failed."""
    if config.max_connection_age_seconds <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, round(config.max_connection_age_seconds * 1000))),
        ("grpc.max_connection_age_grace_ms", max(1, round(config.shutdown_grace_seconds * 1000))),
    ]


def _limit_settings(limits: LimitsConfig) -> dict[str, tuple[float, int, frozenset[str]]]:
    """The enabled rate limits by name: rate, burst and the methods they limit."""
    settings = {
        "send": (limits.send_rate_per_second, limits.send_burst, WRITE_METHODS),
        "read": (limits.read_rate_per_second, limits.read_burst, READ_METHODS),
    }
    return {name: values for name, values in settings.items() if values[0] > 0}


def rate_limiters(
    limits: LimitsConfig, shared: Path | None, stack: AsyncExitStack
) -> dict[str, tuple[Limiter, frozenset[str]]]:
    """The enabled rate limiters and their methods: this process's own, or (with `shared`, the
    directory of the tables the supervising parent created) the host's shared ones."""
    found: dict[str, tuple[Limiter, frozenset[str]]] = {}
    for name, (rate, burst, methods) in _limit_settings(limits).items():
        limiter: Limiter
        if shared is None:
            limiter = TokenBucketLimiter(rate_per_second=rate, burst=burst, max_keys=limits.max_tracked_users)
        else:
            buckets = SharedTokenBuckets(table_path(shared, name), rate_per_second=rate, burst=burst)
            stack.callback(buckets.close)
            limiter = buckets
        found[name] = (limiter, methods)
    return found


@asynccontextmanager
async def running_server(
    config: ServerConfig, *, reuse_port: bool = False, shared_limits: Path | None = None
) -> AsyncIterator[RunningServer]:
    """Open storage, start serving on `config.listen` (port 0 picks one), drain and close on exit.

    `reuse_port` is for the worker processes of `dialog-server --workers` (server.runtime.supervisor),
    which share a port their parent reserved; otherwise a taken port fails the start.
    `shared_limits` is the directory of the rate-limit tables the workers of one parent share
    (server.interceptors.shared_buckets); without it the limits are this process's own.
    """
    verifier = TokenVerifier(config.auth)  # loads the key files: a bad one fails before any connection
    async with (
        AsyncExitStack() as stack,
        ShardSet(config.shards, config.pool, config.resilience) as shards,
        Placement(
            config.control_dsn,
            config.num_shards,
            config.pool,
            moving_wait=config.resilience.moving_wait,
            resilience=config.resilience,
        ) as placement,
    ):
        tokens = PageTokenCodec(config.page_token_secret)
        recorder = ActivityRecorder(max_pairs=config.activity.max_pairs)
        metrics = ServerMetrics(c.shard_id for c in config.shards)
        metrics.watch(
            {c.shard_id: shards.store(c.shard_id).pool for c in config.shards},
            overrides=placement.router.overrides,
            reloads=lambda: placement.reloads,
            breakers=lambda: {s.shard_id: s.primary.breaker.value for s in shards.states()},
            batches=shards.batch_stats,
        )
        limits = config.limits
        interceptors: list[CallInterceptor] = [
            ObserveInterceptor(metrics, RpcLog()),
            ErrorMappingInterceptor(),
            ConcurrencyLimitInterceptor(
                limits.max_concurrent_rpcs,
                (f"/{DIALOG_SERVICE}/", f"/{ADMIN_SERVICE}/"),
                stream_limit=config.delivery.max_streams,
            ),
            DeadlineInterceptor(),
            AuthInterceptor(verifier),
        ]
        limiters = rate_limiters(limits, shared_limits, stack)
        for limiter, methods in limiters.values():
            interceptors.append(RateLimitInterceptor(limiter, methods))
        metrics.watch_rate_limits(
            lambda: {name: limiter.evictions for name, (limiter, _) in limiters.items()}
        )
        server = grpc.aio.server(
            # One interceptor for all: each method's wrapped handler is built on its first call.
            interceptors=[FusedInterceptors(interceptors)],
            # The backstop behind ConcurrencyLimitInterceptor's cap on the services' calls: room for
            # health checks and reflection beyond it; gRPC refuses what passes this before any handler.
            maximum_concurrent_rpcs=(
                limits.max_concurrent_rpcs + config.delivery.max_streams + _UNCAPPED_CALLS
            ),
            options=[
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                # gRPC itself refuses larger requests with RESOURCE_EXHAUSTED before any handler runs.
                ("grpc.max_receive_message_length", limits.max_request_bytes),
                # Never a response a client with default options cannot read (GetDialog pages stay
                # within max_response_bytes, well below).
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
                ("grpc.max_metadata_size", limits.max_metadata_bytes),
                ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
                *_connection_age_options(config),
            ],
        )
        inboxes = await open_inboxes(config, shards, placement)
        delivery = DeliveryHub(
            {c.shard_id: (c, shards.store(c.shard_id).shard) for c in config.shards},
            config.delivery,
            inboxes=inboxes,
        )
        relay = delivery.relay
        metrics.watch_delivery(
            lambda: delivery.subscribers, lambda: None if relay is None else relay.lag_seconds
        )
        dialog_service = DialogService(
            placement,
            shards,
            tokens,
            config.limits,
            recorder,
            delivery=delivery,
            inboxes=inboxes,
            archive=archive_reader(config.archive),
        )
        if relay is not None:
            relay.newest_message = dialog_service.newest_message
        dialog_service_pb2_grpc.add_DialogServiceServicer_to_server(dialog_service, server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminService(
                placement,
                shards,
                tokens,
                max_response_bytes=config.limits.max_response_bytes,
                archiver=archiver_of(config, shards),
                erase_inbox=None if relay is None else relay.erase_user,
            ),
            server,
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if config.reflection:
            reflection.enable_server_reflection(
                (DIALOG_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        try:
            if config.tls is None:
                port = server.add_insecure_port(config.listen)
            else:
                port = server.add_secure_port(config.listen, server_credentials(config.tls))
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on {config.listen}: {exc}") from None
        await server.start()
        try:
            listen = config.metrics.listen
            endpoint = MetricsEndpoint(metrics.registry, listen) if listen is not None else None
        except OSError:
            await server.stop(None)
            raise
        reporter = ShardHealthReporter(
            shards,
            health_servicer,
            services=("", DIALOG_SERVICE),
            admin_service=ADMIN_SERVICE,
            interval=config.resilience.probe_interval,
        )
        await reporter.start()
        resumer = MoveResumer(
            placement.mover(shards), after=config.resilience.move_resume_after, control=placement.control
        )
        await resumer.start()
        await delivery.start()
        # Entered here and left after the server stopped: the last flush counts the drained calls,
        # and it runs before the pools close.
        async with (
            ActivityFlusher(
                recorder,
                shards,
                flush_seconds=config.activity.flush_seconds,
                window_seconds=config.activity.window_seconds,
                retention_seconds=config.activity.retention_seconds,
            ) as flusher,
            AsyncExitStack() as optional,
        ):
            metrics.watch_activity(lambda: flusher.stats)
            rebalancer: Rebalancer | None = None
            if config.rebalance.auto:
                rebalancer = await optional.enter_async_context(
                    Rebalancer(
                        config.rebalance,
                        placement.mover(shards, lock_wait_seconds=0.0),
                        shards,
                        control=placement.control,
                        control_pool=placement.store.pool,
                        control_dsn=config.control_dsn,
                    )
                )
                metrics.watch_rebalancer(rebalancer.stats)
            schedule = archive_schedule(config, shards)
            if schedule is not None:
                await schedule.start()
                optional.push_async_callback(schedule.stop)
            log.info(
                "serving on port %d with %d shards (%s)",
                port,
                config.num_shards,
                "plaintext"
                if config.tls is None
                else "mutual TLS"
                if config.tls.require_client_cert
                else "TLS",
            )
            if endpoint is not None:
                log.info("metrics on %s", endpoint.url)
            try:
                yield RunningServer(
                    server,
                    port,
                    placement,
                    shards,
                    health_servicer,
                    endpoint.port if endpoint else None,
                    flusher,
                    rebalancer,
                    delivery,
                )
            finally:
                # Subscriptions end first (UNAVAILABLE: resume elsewhere): they would hold the drain.
                await delivery.stop()
                await optional.aclose()  # the rebalancer first: no new move while the server drains
                await resumer.stop()
                await reporter.stop()
                await health_servicer.enter_graceful_shutdown()
                await server.stop(config.shutdown_grace_seconds)
                if endpoint is not None:
                    endpoint.close()
                log.info("server stopped")


async def open_inboxes(config: ServerConfig, shards: ShardSet, placement: Placement) -> dict[int, InboxStore]:
    """The inbox shards (the first ones, as many as the control database records: the shards
    configured when the first server started)."""

    async def layout(conn: psycopg.AsyncConnection[Any]) -> int:
        return await inbox_layout(conn, config.num_shards)

    count = await placement.control.run(layout, idempotent=True)
    if count > config.num_shards:
        raise ConfigError(
            f"the inbox lives on the first {count} shards, but only {config.num_shards} are configured: "
            "configure them all"
        )
    return {
        c.shard_id: InboxStore(c.shard_id, c.table, shards.store(c.shard_id).shard)
        for c in config.shards[:count]
    }


def archive_reader(archive: ArchiveConfig) -> ArchiveReader | None:
    """The reader of the configured archive, None without one."""
    store = configured_store(archive)
    return None if store is None else ArchiveReader(store, max_age=archive.manifest_max_age)


def archiver_of(config: ServerConfig, shards: ShardSet) -> Archiver:
    """The archiver of the configured archive (without one it still erases users' messages)."""
    stores = [shards.store(c.shard_id) for c in config.shards]
    return Archiver(stores, config.control_dsn, configured_store(config.archive), config.archive)


def archive_schedule(config: ServerConfig, shards: ShardSet) -> ArchiveSchedule | None:
    """The scheduled archive runs (`[archive] older_than`), None when not configured."""
    older_than = config.archive.older_than_seconds
    if config.archive.url is None or older_than is None:
        return None
    archiver = archiver_of(config, shards)
    return ArchiveSchedule(archiver, older_than=older_than, interval=config.archive.schedule_interval)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials of the listening port; with `require_client_cert`, mutual TLS."""
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.require_client_cert,
    )
