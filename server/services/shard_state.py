"""Shard state snapshots (server.resilience) as AdminService messages."""

from __future__ import annotations

from client.gen.dialog.v1 import admin_service_pb2 as pb
from server.resilience import BreakerState, EndpointState

_BREAKER_STATES = {
    BreakerState.CLOSED: pb.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: pb.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: pb.BREAKER_STATE_HALF_OPEN,
}


def endpoint_health(state: EndpointState) -> pb.EndpointHealth:
    """One database's health: up, breaker, failures, last error and (replicas) lag."""
    health = pb.EndpointHealth(
        location=state.location,
        up=state.available,
        breaker_state=_BREAKER_STATES[state.breaker],
        consecutive_failures=state.consecutive_failures,
        breaker_trips=state.breaker_trips,
        last_error=state.last_error or "",
    )
    if state.lag_seconds is not None:
        health.lag_seconds = state.lag_seconds
    return health
