"""Prometheus metrics: what the server counts and the HTTP endpoint that serves them.

Naming. RPC metrics follow the go-grpc-prometheus convention, so its dashboards and alerts
work unchanged: `grpc_server_started_total`, `grpc_server_handled_total` and the histogram
`grpc_server_handling_seconds`, labelled `grpc_type`, `grpc_service`, `grpc_method` and (on
`handled`) `grpc_code` with Go's code names (`OK`, `InvalidArgument`, `Unavailable`, ...). The
histogram has one label more, `shard` (the shard the call's pair resolved to, `none` for calls
that resolve none); `sum by (grpc_method)` gives the conventional series. Everything
specific to the service is prefixed `dialog_shard_`.

Cardinality is bounded by construction: methods come from the registered services (an unknown
method never gets a handler, so it is never counted), shard labels from the configured shards,
codes from the 17 gRPC codes. No user id, pair or text is ever a label.

State that already lives elsewhere (pool statistics, the shard map mirror, circuit breakers) is
read when Prometheus scrapes (`StateCollector`), so it costs the calls nothing.

Each server has its own registry. Several server processes on one host (workers) each serve
their own endpoint: `MetricsConfig.for_worker(i)` puts worker i on the configured port + i.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from server.config import split_host_port
from server.observability.activity import FlushStats
from server.storage.batching import BatchStats

#: The `shard` label of a call that resolved no shard.
NO_SHARD = "none"
#: The `shard` label of a call routed to a shard this server is not configured with (a stray
#: shard_map row): such calls fail, and the label stays bounded whatever the table holds.
UNCONFIGURED_SHARD = "unconfigured"

#: Latency buckets in seconds: sub-millisecond resolution where this service's calls land.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Breaker states as gauge values (`dialog_shard_breaker_state`).
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def go_code_name(code: grpc.StatusCode) -> str:
    """Go's name of a code (`INVALID_ARGUMENT` -> `InvalidArgument`), as go-grpc-prometheus labels it."""
    if code is grpc.StatusCode.OK:
        return "OK"
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"  # Go spells it with one l
    return "".join(part.capitalize() for part in code.name.split("_"))


_CODE_NAMES = {code: go_code_name(code) for code in grpc.StatusCode}


class ResponseCounter(Protocol):
    """Counts what a response carries (messages written or read) on the call's shard."""

    def __call__(self, metrics: ServerMetrics, shard: int, response: Any) -> None: ...


def _count_written(metrics: ServerMetrics, shard: int, response: Any) -> None:
    if not response.replayed:  # a replayed request_id wrote nothing
        metrics.per_shard(metrics.messages_written, shard).inc()


def _count_read(metrics: ServerMetrics, shard: int, response: Any) -> None:
    metrics.per_shard(metrics.messages_read, shard).inc(len(response.messages))


#: Methods whose responses say how many messages were written or read.
RESPONSE_COUNTERS: dict[str, ResponseCounter] = {
    "/dialog.v1.DialogService/SendMessage": _count_written,
    "/dialog.v1.DialogService/GetDialog": _count_read,
}


class MethodMetrics:
    """The label children of one method, made once and cached (a call only looks them up)."""

    __slots__ = (
        "_handled",
        "_handling",
        "_labels",
        "_metrics",
        "_response_counter",
        "_started",
        "name",
        "service",
    )

    def __init__(self, metrics: ServerMetrics, full_method: str) -> None:
        self.service, _, self.name = full_method.lstrip("/").rpartition("/")
        self._metrics = metrics
        self._labels = ("unary", self.service, self.name)
        self._handled: dict[grpc.StatusCode, Any] = {}
        self._handling: dict[int | None, Any] = {}
        self._response_counter = RESPONSE_COUNTERS.get(full_method)
        self._started = metrics.started.labels(*self._labels)
        # The common outcome exists from the start, so rates work before the first call.
        self._handled_child(grpc.StatusCode.OK)

    def started(self) -> None:
        self._started.inc()

    def handled(self, code: grpc.StatusCode, seconds: float, shard: int | None, response: Any) -> None:
        self._handled_child(code).inc()
        child = self._handling.get(shard)
        if child is None:
            label = self._metrics.shard_label(shard)
            child = self._handling[shard] = self._metrics.handling.labels(*self._labels, label)
        child.observe(seconds)
        if response is not None and shard is not None and self._response_counter is not None:
            self._response_counter(self._metrics, shard, response)

    def _handled_child(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._metrics.handled.labels(*self._labels, _CODE_NAMES[code])
        return child


class ServerMetrics:
    """The server's metrics in their own registry (two servers in one process never mix)."""

    def __init__(self, shard_ids: Iterable[int]) -> None:
        self.registry = CollectorRegistry()
        rpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", rpc_labels, registry=self.registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*rpc_labels, "grpc_code"),
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to its status, by method and the shard it resolved to.",
            (*rpc_labels, "shard"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.messages_written = Counter(
            "dialog_shard_messages_written",
            "Messages stored by SendMessage (replays of a request_id not counted), by shard.",
            ("shard",),
            registry=self.registry,
        )
        self.messages_read = Counter(
            "dialog_shard_messages_read",
            "Messages returned by GetDialog, by shard.",
            ("shard",),
            registry=self.registry,
        )
        self._shard_labels = {shard: str(shard) for shard in shard_ids}
        self._children: dict[tuple[Counter, int], Any] = {}
        for shard in self._shard_labels:
            self.per_shard(self.messages_written, shard)
            self.per_shard(self.messages_read, shard)
        self._methods: dict[str, MethodMetrics] = {}

    def shard_label(self, shard: int | None) -> str:
        """The `shard` label value of a call: a configured shard id, `none` or `unconfigured`."""
        if shard is None:
            return NO_SHARD
        return self._shard_labels.get(shard, UNCONFIGURED_SHARD)

    def per_shard(self, counter: Counter, shard: int) -> Any:
        """The child of a `shard`-labelled counter, made once."""
        child = self._children.get((counter, shard))
        if child is None:
            child = self._children[counter, shard] = counter.labels(self.shard_label(shard))
        return child

    def method(self, full_method: str) -> MethodMetrics:
        """The metrics of a registered method (`/package.Service/Method`)."""
        found = self._methods.get(full_method)
        if found is None:
            found = self._methods[full_method] = MethodMetrics(self, full_method)
        return found

    def watch(
        self,
        pools: Mapping[int, AsyncConnectionPool[Any]],
        overrides: Callable[[], Mapping[Any, int]],
        reloads: Callable[[], int],
        breakers: Callable[[], Mapping[int, str]] | None = None,
        batches: Callable[[], Mapping[int, BatchStats]] | None = None,
    ) -> None:
        """Export state read at scrape time: pool statistics, overrides, mirror reloads, breakers
        and write batching."""
        self.registry.register(StateCollector(pools, overrides, reloads, breakers, batches))

    def watch_activity(self, stats: Callable[[], FlushStats]) -> None:
        """Export the recent-activity flusher's counters, read at scrape time."""
        self.registry.register(ActivityCollector(stats))

    def watch_rebalancer(self, stats: RebalancerStats) -> None:
        """Export the automatic rebalancer's counters and its view, read at scrape time."""
        self.registry.register(RebalancerCollector(stats))

    def watch_rate_limits(self, evictions: Callable[[], Mapping[str, int]]) -> None:
        """Export the rate limiters' evictions (by limit: `send`, `read`), read at scrape time."""
        self.registry.register(EvictionCollector(evictions))


class ActivityCollector(Collector):
    """The recent-activity flusher's work: flushes, failures, counts dropped, windows pruned."""

    def __init__(self, stats: Callable[[], FlushStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield CounterMetricFamily(
            "dialog_shard_activity_flushes",
            "Flushes of recent-activity counts to the shards.",
            value=stats.flushes,
        )
        yield CounterMetricFamily(
            "dialog_shard_activity_flush_failures",
            "Shard flushes of recent-activity counts that failed (their counts were dropped).",
            value=stats.failures,
        )
        yield CounterMetricFamily(
            "dialog_shard_activity_dropped_events",
            "Calls (messages and reads) whose recent-activity counts were dropped by a failed flush.",
            value=stats.dropped_events,
        )
        yield CounterMetricFamily(
            "dialog_shard_activity_pruned_rows",
            "Rows of recent-activity windows past the retention deleted by this process.",
            value=stats.pruned_rows,
        )


@dataclass(slots=True)
class RebalancerStats:
    """What the automatic rebalancer (server.moves.rebalancer) counts, read at scrape time."""

    leader: bool = False
    rounds: Tally[str] = field(default_factory=Tally)
    moves: int = 0
    rows_moved: int = 0
    failed_moves: int = 0
    skipped: int = 0
    #: The heaviest shard's load over the mean, as the last round saw it.
    imbalance: float = 0.0
    #: The last round: when (epoch seconds), its outcome and reason.
    last_round_at: float = 0.0
    last_outcome: str = ""
    last_reason: str = ""


#: Every outcome of a rebalance round (server.routing.rebalance.Outcome), so each series exists at once.
REBALANCE_OUTCOMES = ("idle", "balanced", "moves", "unhelpable", "budget", "paused")


class RebalancerCollector(Collector):
    """The automatic rebalancer: leadership, rounds by outcome, moves, rows, skips, the imbalance seen."""

    def __init__(self, stats: RebalancerStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        yield GaugeMetricFamily(
            "dialog_shard_rebalance_leader",
            "1 while this process's rebalancer holds the cluster's rebalancer lock (it acts), else 0.",
            value=1 if stats.leader else 0,
        )
        rounds = CounterMetricFamily(
            "dialog_shard_rebalance_rounds",
            "Rounds of the acting rebalancer, by outcome.",
            labels=["outcome"],
        )
        for outcome in REBALANCE_OUTCOMES:
            rounds.add_metric([outcome], stats.rounds.get(outcome, 0))
        yield rounds
        yield CounterMetricFamily(
            "dialog_shard_rebalance_moves", "Pairs the rebalancer moved.", value=stats.moves
        )
        yield CounterMetricFamily(
            "dialog_shard_rebalance_rows_moved",
            "Messages the rebalancer's moves copied.",
            value=stats.rows_moved,
        )
        yield CounterMetricFamily(
            "dialog_shard_rebalance_failed_moves",
            "Moves of the rebalancer that failed.",
            value=stats.failed_moves,
        )
        yield CounterMetricFamily(
            "dialog_shard_rebalance_skips",
            "Candidate pairs the rebalancer left alone (pinned, cooling down, alone above the fair "
            "share, movers' lock busy).",
            value=stats.skipped,
        )
        yield GaugeMetricFamily(
            "dialog_shard_rebalance_imbalance",
            "The heaviest routed shard's load over the mean, as the last round saw it (0: no load).",
            value=stats.imbalance,
        )


class EvictionCollector(Collector):
    """Per-user buckets a rate limiter gave away for room before they were full again."""

    def __init__(self, evictions: Callable[[], Mapping[str, int]]) -> None:
        self._evictions = evictions

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "dialog_shard_rate_limit_evictions",
            "Users whose rate-limit bucket was dropped for room before it was full again "
            "(they got a fresh burst early): the table of tracked users is too small.",
            labels=["limit"],
        )
        for limit, count in sorted(self._evictions().items()):
            family.add_metric([limit], count)
        yield family


class StateCollector(Collector):
    """Reads the pools, the shard-map mirror and the breakers when Prometheus scrapes.

    Runs on the HTTP server's thread: it only reads counters and lengths (atomic under the GIL).
    """

    def __init__(
        self,
        pools: Mapping[int, AsyncConnectionPool[Any]],
        overrides: Callable[[], Mapping[Any, int]],
        reloads: Callable[[], int],
        breakers: Callable[[], Mapping[int, str]] | None,
        batches: Callable[[], Mapping[int, BatchStats]] | None = None,
    ) -> None:
        self._pools = dict(pools)
        self._overrides = overrides
        self._reloads = reloads
        self._breakers = breakers
        self._batches = batches

    def collect(self) -> Iterator[Metric]:
        yield from self._pool_metrics()
        per_shard = Tally(self._overrides().values())
        overrides = GaugeMetricFamily(
            "dialog_shard_overrides", "Pairs pinned to the shard by the shard map.", labels=["shard"]
        )
        for shard in self._pools:
            overrides.add_metric([str(shard)], per_shard.get(shard, 0))
        yield overrides
        yield CounterMetricFamily(
            "dialog_shard_override_reloads",
            "Full reloads of the in-memory shard map (startup and every reconnect of its listener).",
            value=self._reloads(),
        )
        if self._breakers is not None:
            state = GaugeMetricFamily(
                "dialog_shard_breaker_state",
                "Circuit breaker of the shard: 0 closed, 1 half-open, 2 open.",
                labels=["shard"],
            )
            for shard, name in sorted(self._breakers().items()):
                state.add_metric([str(shard)], BREAKER_STATES.get(name, 2))
            yield state
        if self._batches is not None:
            yield from self._batch_metrics(self._batches())

    @staticmethod
    def _batch_metrics(batches: Mapping[int, BatchStats]) -> Iterator[Metric]:
        # Messages per statement is what batching buys: each statement is one round trip and one
        # commit. Near 1 means the shard's inserts rarely overlap (low load, or load spread thin).
        statements = CounterMetricFamily(
            "dialog_shard_insert_statements",
            "INSERT statements that stored messages: `single` (one message) or `batch` (several).",
            labels=["shard", "kind"],
        )
        messages = CounterMetricFamily(
            "dialog_shard_insert_statement_messages",
            "Messages carried by those statements (stored or replayed), by kind.",
            labels=["shard", "kind"],
        )
        splits = CounterMetricFamily(
            "dialog_shard_insert_batch_splits",
            "Batch statements refused by the database and retried message by message.",
            labels=["shard"],
        )
        for shard, stats in sorted(batches.items()):
            label = str(shard)
            statements.add_metric([label, "single"], stats.single)
            statements.add_metric([label, "batch"], stats.batches)
            messages.add_metric([label, "single"], stats.single)
            messages.add_metric([label, "batch"], stats.batched_messages)
            splits.add_metric([label], stats.split)
        yield statements
        yield messages
        yield splits

    def _pool_metrics(self) -> Iterator[Metric]:
        gauges: dict[str, GaugeMetricFamily] = {
            "pool_size": GaugeMetricFamily(
                "dialog_shard_pool_size", "Connections in the shard's pool (busy or idle).", labels=["shard"]
            ),
            "pool_max": GaugeMetricFamily(
                "dialog_shard_pool_max_size", "Most connections the shard's pool may open.", labels=["shard"]
            ),
            "pool_available": GaugeMetricFamily(
                "dialog_shard_pool_available", "Idle connections in the shard's pool.", labels=["shard"]
            ),
            "requests_waiting": GaugeMetricFamily(
                "dialog_shard_pool_waiting", "Calls waiting for a connection of the shard.", labels=["shard"]
            ),
        }
        counters: dict[str, CounterMetricFamily] = {
            "requests_errors": CounterMetricFamily(
                "dialog_shard_pool_request_errors",
                "Connection requests that failed (timeout, pool closed), by shard.",
                labels=["shard"],
            ),
            "connections_errors": CounterMetricFamily(
                "dialog_shard_pool_connection_errors",
                "Failed attempts to open a connection to the shard.",
                labels=["shard"],
            ),
            "connections_lost": CounterMetricFamily(
                "dialog_shard_pool_connections_lost",
                "Connections of the shard found broken and discarded.",
                labels=["shard"],
            ),
        }
        for shard, pool in self._pools.items():
            stats = pool.get_stats()
            for key, gauge in gauges.items():
                gauge.add_metric([str(shard)], stats.get(key, 0))
            for key, counter in counters.items():
                counter.add_metric([str(shard)], stats.get(key, 0))
        yield from gauges.values()
        yield from counters.values()


class MetricsEndpoint:
    """prometheus-client's HTTP server for one registry, on a daemon thread beside the event loop."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        host, port = split_host_port(listen)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
