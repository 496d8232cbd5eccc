"""Keeping the service up through shard failures: breakers, deadlines, retries, probes, replicas.

- `breaker`: the pure circuit breaker state machine.
- `deadline`: the RPC's deadline in a contextvar, read by the gates.
- `retry`: which failures are transient, and the jittered backoff.
- `gate`: `ShardGate`, the one way every statement reaches a shard's database.
- `monitor`: `EndpointMonitor`, a heartbeat per database that opens and closes the breaker.
- `shard`: `Shard`, a primary plus replicas with read routing, and `ShardState` snapshots.
"""

from server.resilience.breaker import BreakerState, CircuitBreaker
from server.resilience.deadline import rpc_deadline
from server.resilience.gate import ShardGate
from server.resilience.monitor import EndpointMonitor
from server.resilience.shard import EndpointState, Shard, ShardState

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "EndpointMonitor",
    "EndpointState",
    "Shard",
    "ShardGate",
    "ShardState",
    "rpc_deadline",
]
