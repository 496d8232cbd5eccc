"""Wiring: the server's whole lifetime as one async context manager.

Order on the way up: shard pools (with schema) -> control pool and shard-map
mirror -> gRPC server (servicers, health, reflection) -> SERVING. On the way
down, the reverse: NOT_SERVING -> stop accepting and drain in-flight RPCs
within the grace period -> close the mirror and the pools.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from client.gen.dialog.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    dialog_service_pb2,
    dialog_service_pb2_grpc,
)
from server.auth import TokenVerifier
from server.config import ServerConfig
from server.interceptors import AuthInterceptor, ErrorMappingInterceptor
from server.pagination import PageTokenCodec
from server.placement import Placement
from server.services.admin import AdminService
from server.services.dialog import DialogService
from server.storage.pools import ShardSet

log = logging.getLogger(__name__)

DIALOG_SERVICE = dialog_service_pb2.DESCRIPTOR.services_by_name["DialogService"].full_name
ADMIN_SERVICE = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


@dataclass(frozen=True, slots=True)
class RunningServer:
    """A started server: the port it listens on and the parts tests and tools inspect."""

    server: grpc.aio.Server
    port: int
    placement: Placement
    shards: ShardSet
    health: health.aio.HealthServicer


@asynccontextmanager
async def running_server(config: ServerConfig) -> AsyncIterator[RunningServer]:
    """Open storage, start serving on `config.listen` (port 0 picks one), drain and close on exit."""
    async with (
        ShardSet(config.shards, config.pool) as shards,
        Placement(config.control_dsn, config.num_shards, config.pool) as placement,
    ):
        tokens = PageTokenCodec(config.page_token_secret)
        server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor(), AuthInterceptor(TokenVerifier(config.auth))],
            options=[("grpc.so_reuseport", 0)],
        )
        dialog_service_pb2_grpc.add_DialogServiceServicer_to_server(
            DialogService(placement, shards, tokens, config.limits), server
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminService(placement, shards, tokens), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if config.reflection:
            reflection.enable_server_reflection(
                (DIALOG_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        try:
            port = server.add_insecure_port(config.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {config.listen}: {exc}") from None
        await server.start()
        for name in ("", DIALOG_SERVICE, ADMIN_SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on port %d with %d shards", port, config.num_shards)
        try:
            yield RunningServer(server, port, placement, shards, health_servicer)
        finally:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(config.shutdown_grace_seconds)
            log.info("server stopped")
