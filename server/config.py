"""The one configuration loader.

Configuration comes from an optional TOML file (`--config PATH` or
`DIALOG_CONFIG`) overlaid by environment variables; everything else in the
server receives the frozen `ServerConfig` built here. A minimal file::

    listen = "127.0.0.1:50051"
    control_dsn = "postgresql://postgres@10.0.0.1:5432/dialog"   # shard_map; default: shard 0's DSN

    [auth]
    jwt_secret_file = "/etc/dialog-shard/jwt-secret"   # >= 32 bytes, as inline jwt_secret and env
    # Or public keys of an external issuer (RS256/ES256 and friends), one PEM or a JWKS with kids;
    # then issuer and audience are required (and checked in every token):
    # algorithms = ["RS256", "ES256"]
    # jwks_file = "/etc/dialog-shard/jwks.json"        # or public_key_file = "issuer.pem"
    # issuer = "https://issuer.example"
    # audience = "dialog-shard"
    max_token_lifetime_seconds = 86400      # exp - iat of user tokens (iat required); 0: no limit
    max_admin_token_lifetime_seconds = 3600 # the same for admin tokens
    leeway_seconds = 30                     # clock skew on exp/nbf/iat, at most 300
    # revocation_file = "/etc/dialog-shard/revoked.json"  # {"jti": [...], "kid": [...]}, re-read on change

    [tls]                                   # optional; without it the port is plaintext
    cert_file = "/etc/dialog-shard/server.pem"      # certificate chain, leaf first
    key_file = "/etc/dialog-shard/server.key"
    client_ca_file = "/etc/dialog-shard/clients-ca.pem"   # mutual TLS: CAs of client certificates
    require_client_cert = true
    # For dialogctl reading this file (the server ignores them): the CA of cert_file, and
    # dialogctl's own certificate when the server requires one.
    # server_ca_file = "/etc/dialog-shard/server-ca.pem"
    # client_cert_file = "/etc/dialog-shard/dialogctl.pem"
    # client_key_file = "/etc/dialog-shard/dialogctl.key"

    [limits]
    send_rate_per_second = 20               # per-user SendMessage token bucket; 0 disables
    send_burst = 100
    read_rate_per_second = 50               # per-user GetDialog token bucket; 0 disables
    read_burst = 200
    max_response_bytes = 1048576            # a GetDialog page ends at this many bytes (>= 1 message)
    max_concurrent_rpcs = 256               # per server process; more are RESOURCE_EXHAUSTED

    [metrics]
    listen = "127.0.0.1:9464"               # Prometheus endpoint http://ADDRESS/metrics; port 0 picks one
                                            # (default: loopback only; "0.0.0.0:9464" for a remote scraper)
    # enabled = false                       # no endpoint at all

    [log]
    format = "auto"                         # json | text | auto (text on a terminal, else JSON)
    level = "INFO"
    rpc = true                              # one line per RPC (logger server.rpc, INFO)

    [delivery]                              # SubscribeMessages (server.delivery); optional
    retention_seconds = 86400               # a resume_token older than this is OUT_OF_RANGE
    stream_buffer = 1024                    # messages queued per subscriber before SUBSCRIBER_TOO_SLOW
    max_streams = 10000                     # subscriptions per server process
    [archive]                               # optional; see ArchiveConfig for every key
    url = "/var/lib/dialog-shard/archive"   # or "s3://bucket/prefix" (with endpoint_url for non-AWS S3)
    older_than = "365d"                     # the servers archive older messages daily; omit: only dialogctl

    [resilience]                            # optional; see ResilienceConfig for every key
    require_all_shards = false              # start with some shards down (they answer UNAVAILABLE)
    replica_reads = true                    # GetDialog may read from a replica lagging <= replica_max_lag
    replica_max_lag = 5.0

    [rebalance]                             # optional; see RebalanceConfig for every key
    auto = false                            # move hot pairs off a hot shard on its own
    interval = 60                           # seconds between its rounds

    [[shards]]
    id = 0
    dsn = "postgresql://postgres@10.0.0.1:5432/dialog"
    replica_dsns = ["postgresql://postgres@10.0.1.1:5432/dialog"]   # streaming replicas, optional
    [[shards]]
    id = 1
    dsn = "postgresql://postgres@10.0.0.2:5432/dialog"

Environment variables (they win over the file):

- `DIALOG_LISTEN`: address to serve on.
- `DIALOG_SHARD_DSNS`: comma-separated DSNs, one per shard in id order; a
  single DSN with `DIALOG_NUM_SHARDS` puts that many tables in one database
  (the seed's layout: `messages_0..3` side by side).
- `DIALOG_NUM_SHARDS`, `DIALOG_CONTROL_DSN`, `DIALOG_WORKERS` (server processes, default 1),
  `DIALOG_PIN_WORKERS` (`1`: pin worker i to the i-th CPU; for a machine running one server).
- `DIALOG_JWT_SECRET` / `DIALOG_JWT_SECRET_FILE`: HS256 key (at least 32 bytes).
- `DIALOG_JWT_ALGORITHMS` (comma-separated), `DIALOG_JWT_PUBLIC_KEY_FILE`, `DIALOG_JWKS_FILE`,
  `DIALOG_JWT_ISSUER`, `DIALOG_JWT_AUDIENCE`, `DIALOG_JWT_REVOCATION_FILE`.
- `DIALOG_PAGE_TOKEN_SECRET`: key signing page tokens (default: derived from the JWT key;
  required when only public keys are configured).
- `DIALOG_METRICS_LISTEN`: address of the metrics endpoint, or `off`.
- `DIALOG_LOG_FORMAT` (`json`, `text`, `auto`), `DIALOG_LOG_LEVEL`, `DIALOG_LOG_RPC` (`0` silences
  the per-RPC lines).
- `DIALOG_REBALANCE_AUTO` (`1` turns the automatic rebalancer on), `DIALOG_REBALANCE_INTERVAL`
  (seconds between its rounds): the `[rebalance]` keys `auto` and `interval`.
- `DIALOG_ARCHIVE_URL`, `DIALOG_ARCHIVE_ENDPOINT_URL`, `DIALOG_ARCHIVE_OLDER_THAN`: the `[archive]`
  keys `url`, `endpoint_url` and `older_than` (S3 credentials come from the usual `AWS_*` variables).
- `DIALOG_SEND_RATE_PER_SECOND`, `DIALOG_SEND_BURST`, `DIALOG_READ_RATE_PER_SECOND`,
  `DIALOG_READ_BURST`, `DIALOG_MAX_RESPONSE_BYTES`, `DIALOG_MAX_CONCURRENT_RPCS`: the `[limits]`
  keys of the same names.

Relative file paths are relative to the config file's directory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict

from server.errors import StartupError

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_NUM_SHARDS = 4
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
LOG_FORMATS = ("auto", "json", "text")
#: JWT algorithms verified with the shared secret.
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
#: JWT algorithms verified with an issuer's public key (PEM file or JWKS).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]*")
#: The longest name derived from a shard's table: PostgreSQL names the fence table's state check
#: `<table>_fences_state_check` (server/storage/fences.py; the others are `<table>_writable_batch`,
#: `<table>_fences_pkey`, `<table>_request_idx`, ...).
LONGEST_TABLE_SUFFIX = "_fences_state_check"
#: PostgreSQL identifiers are at most 63 bytes (NAMEDATALEN - 1); longer ones are silently cut, so a
#: table name leaves room for every name derived from it.
MAX_TABLE_NAME_CHARS = 63 - len(LONGEST_TABLE_SUFFIX)
#: Shortest HS* secret accepted from any source (file, inline, environment), in bytes.
MIN_SECRET_BYTES = 32
#: Largest accepted `[auth] leeway_seconds`: clock skew beyond this is a broken clock, not skew.
MAX_LEEWAY_SECONDS = 300.0
#: Default longest lifetime (exp - iat) of a user token: a day, so a session token lasts a working day.
DEFAULT_MAX_TOKEN_LIFETIME = 24 * 3600.0
#: Default longest lifetime of an admin token: an hour, what one operator task takes.
DEFAULT_MAX_ADMIN_TOKEN_LIFETIME = 3600.0
#: Largest message the server sends (`grpc.max_send_message_length`): gRPC's default receive limit,
#: so that a client with default options can read every response.
MAX_SEND_BYTES = 4 * 1024 * 1024
#: Room kept beside `max_response_bytes` under MAX_SEND_BYTES (page token, framing).
_RESPONSE_HEADROOM = 64 * 1024
#: [limits] keys an environment variable `DIALOG_<KEY>` overrides.
_LIMITS_FROM_ENV = (
    "send_rate_per_second",
    "send_burst",
    "read_rate_per_second",
    "read_burst",
    "max_response_bytes",
    "max_concurrent_rpcs",
)


class ConfigError(StartupError, ValueError):
    """The configuration is incomplete or inconsistent; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Where one shard's messages live."""

    shard_id: int
    #: libpq connection string or URI of the shard's PostgreSQL database.
    dsn: str
    #: Table holding the shard's messages (the seed's `messages_N`).
    table: str
    #: Streaming replicas of the shard's database (GetDialog may read there; see ResilienceConfig).
    replica_dsns: tuple[str, ...] = ()

    @property
    def location(self) -> str:
        """Host, port and database of the shard, without credentials (safe to log and show)."""
        return describe_dsn(self.dsn)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Per-shard connection pool sizing (psycopg_pool.AsyncConnectionPool)."""

    #: Connections kept open per shard.
    min_size: int = 2
    #: Upper bound of connections per shard.
    max_size: int = 10
    #: Seconds to wait for a connection before failing the call with UNAVAILABLE.
    acquire_timeout: float = 5.0
    #: Seconds to wait for each shard at startup before failing fast.
    open_timeout: float = 10.0
    #: Most concurrent SendMessage inserts of one shard sent as one statement and commit
    #: (server.storage.batching); 1 sends every insert alone.
    max_write_batch: int = 64
    #: Longest wait (milliseconds) of a queued insert for as many others as its shard's last batch
    #: had (server.storage.batching); 0 never waits. No wait while a shard's inserts come alone.
    max_write_batch_wait_ms: float = 4.0


@dataclass(frozen=True, slots=True)
class ResilienceConfig:
    """How the server keeps serving through shard failures (server.resilience)."""

    #: Consecutive failed calls of a shard that open its circuit breaker.
    failure_threshold: int = 5
    #: Seconds an open breaker refuses calls before letting one trial call through.
    open_seconds: float = 2.0
    #: Seconds between health probes of each shard (and replica lag readings).
    probe_interval: float = 1.0
    #: Seconds a probe may take before it counts as unanswered.
    probe_timeout: float = 1.0
    #: Unanswered probes in a row (the next one follows at once) that declare the shard hung: its
    #: breaker opens and the calls waiting on it get UNAVAILABLE at once. With the defaults a
    #: call on a server that stopped answering fails within probe_interval + 2 x probe_timeout.
    hung_after_probes: int = 2
    #: Ceiling of one statement, in seconds: the client side cancels then, and the connection's
    #: `statement_timeout` stops the server side too. An RPC deadline lowers it per call.
    statement_timeout: float = 10.0
    #: Attempts of one shard call on transient errors (1 disables retries).
    retry_attempts: int = 3
    #: First retry backoff in seconds; doubles per attempt, with full jitter.
    retry_backoff: float = 0.05
    #: Largest retry backoff in seconds.
    retry_backoff_max: float = 1.0
    #: Seconds a pool keeps retrying a lost connection before leaving the slot to on-demand growth.
    reconnect_timeout: float = 5.0
    #: Refuse to start unless every shard is reachable (default: start degraded).
    require_all_shards: bool = False
    #: GetDialog reads from a replica whose lag is within `replica_max_lag` (else the primary).
    replica_reads: bool = False
    #: Largest acceptable replica lag for reads, in seconds.
    replica_max_lag: float = 5.0
    #: Seconds after which a server completes an unfinished move whose mover is gone (its
    #: lock is free), so a crashed `dialogctl` does not leave a unit's writes paused; 0: never.
    move_resume_after: float = 30.0
    #: Seconds a call to a moving dialog waits (within its deadline) for routing to flip before
    #: answering UNAVAILABLE / DIALOG_MOVING; 0: answer at once.
    moving_wait: float = 1.0


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """Live delivery (SubscribeMessages) from the shards' message logs (server.delivery)."""

    #: Seconds a message stays in its shard's log: a subscriber can resume from a token this old.
    retention_seconds: float = 86400.0
    #: Messages queued for one subscriber beyond what its connection takes; a subscriber that falls
    #: further behind is cut off (RESOURCE_EXHAUSTED, SUBSCRIBER_TOO_SLOW) and resumes.
    stream_buffer: int = 1024
    #: Subscriptions one server process serves at once; more are RESOURCE_EXHAUSTED (TOO_MANY_STREAMS).
    max_streams: int = 10_000
    #: Seconds between reads of a shard's log when no wake-up (NOTIFY) came: the delivery latency
    #: of a message whose wake-up was lost.
    poll_interval: float = 1.0
    #: Seconds between prunings of the logs' events older than `retention_seconds`.
    prune_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """Cold storage of old messages (server.archive): Parquet files in a directory or an S3 bucket."""

    #: A local directory, or `s3://bucket/prefix`; None: no archive (GetDialog reads only the shards).
    url: str | None = None
    #: The S3 API's endpoint for S3-compatible storage other than AWS (e.g. `http://10.0.0.5:9000`).
    endpoint_url: str | None = None
    #: The S3 region; None: the AWS default chain's.
    region: str | None = None
    #: Messages older than this (`90d`, `12h`, `30m`, `45s`) are archived by the servers on their
    #: own every `schedule_interval` seconds; None: only `dialogctl archive` archives.
    older_than: str | None = None
    #: Seconds between scheduled archive runs (one server runs each: it takes the movers' lock).
    schedule_interval: float = 86400.0
    #: Seconds a server reads pages with the archive's manifest as it loaded it before loading it
    #: again. An archive run waits this long (and a second) after publishing files before it deletes
    #: their rows from the shards, so no server misses a message between the two.
    manifest_max_age: float = 2.0
    #: Most rows one archive file (one batch) holds; a batch is held in memory while written.
    batch_rows: int = 100_000
    #: Rows per Parquet row group: the unit a page deep in the archive reads.
    row_group_rows: int = 2048
    #: Files a part may have before an archive run merges its smallest ones (each run adds up to
    #: one per shard): a page reads every file holding its dialog.
    max_files_per_part: int = 8

    @property
    def older_than_seconds(self) -> float | None:
        return None if self.older_than is None else parse_duration(self.older_than)


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in `90d`, `12h`, `30m` or `45s`; ValueError with the accepted forms otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: write a number with s, m, h or d (e.g. 90d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Bearer token verification."""

    #: Shared key of the HS* algorithms; required when `algorithms` has one.
    jwt_secret: bytes | None
    #: Accepted signature algorithms (HS*, RS*, PS*, ES*; never `none`).
    algorithms: tuple[str, ...] = ("HS256",)
    #: PEM public key verifying RS*/PS*/ES* tokens (absolute path).
    public_key_file: Path | None = None
    #: JWKS file whose keys verify RS*/PS*/ES* tokens by `kid`; re-read when it changes.
    jwks_file: Path | None = None
    #: Required `iss` claim, if set (required setting with public keys or a JWKS).
    issuer: str | None = None
    #: Required `aud` claim, if set (required setting with public keys or a JWKS).
    audience: str | None = None
    #: Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds (0..MAX_LEEWAY_SECONDS).
    leeway_seconds: float = 30.0
    #: Claim that marks an administrator (`"admin": true`).
    admin_claim: str = "admin"
    #: Longest accepted lifetime (`exp - iat`) of a user token, in seconds; tokens then need `iat`.
    #: 0: no limit (and `iat` is optional).
    max_token_lifetime_seconds: float = DEFAULT_MAX_TOKEN_LIFETIME
    #: The same for tokens with the admin claim; 0: no limit.
    max_admin_token_lifetime_seconds: float = DEFAULT_MAX_ADMIN_TOKEN_LIFETIME
    #: JSON file of revoked token ids and key ids (`{"jti": [...], "kid": [...]}`); re-read when it
    #: changes, so a revocation applies at once, to tokens already verified too.
    revocation_file: Path | None = None

    def max_lifetime(self, admin: bool) -> float:
        """The longest accepted lifetime of a token (admin or not) in seconds; 0: no limit."""
        return self.max_admin_token_lifetime_seconds if admin else self.max_token_lifetime_seconds


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Request limits."""

    #: Longest accepted message text, in Unicode code points.
    max_text_chars: int = 4096
    #: Longest accepted message text, in UTF-8 bytes.
    max_text_bytes: int = 16384
    #: GetDialog page size when the request says 0.
    default_page_size: int = 50
    #: Larger page sizes are treated as this (AIP-158).
    max_page_size: int = 1000
    #: Sustained SendMessage calls per second allowed to one user; 0 disables rate limiting.
    send_rate_per_second: float = 20.0
    #: SendMessage calls one user may make at once before the sustained rate applies.
    send_burst: int = 100
    #: Sustained GetDialog calls per second allowed to one user; 0 disables the read limit.
    read_rate_per_second: float = 50.0
    #: GetDialog calls one user may make at once before the sustained rate applies.
    read_burst: int = 200
    #: Bytes of a GetDialog page: the page ends before the message that would pass them (it always
    #: holds one message) and its next_page_token continues there. Well under gRPC's default 4 MiB
    #: receive limit, and what bounds a read's memory on the server.
    max_response_bytes: int = 1024 * 1024
    #: DialogService and AdminService calls one server process runs at once; more are answered
    #: RESOURCE_EXHAUSTED (TOO_MANY_CALLS, RetryInfo) at once; health checks are not counted.
    #: With max_response_bytes it bounds the memory reads can take.
    max_concurrent_rpcs: int = 256
    #: Users whose rate-limit state is kept; idle users are forgotten first.
    max_tracked_users: int = 100_000
    #: Largest request message the server reads, in bytes (gRPC answers RESOURCE_EXHAUSTED beyond).
    max_request_bytes: int = 65536
    #: Largest request metadata (headers) the server reads, in bytes.
    max_metadata_bytes: int = 16384


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Transport security of the listening port (PEM contents, read at load time)."""

    #: Server certificate chain, leaf first.
    cert_chain: bytes
    #: The server certificate's private key.
    private_key: bytes
    #: CAs whose client certificates are accepted (mutual TLS); None: no client certificates asked.
    client_ca: bytes | None = None
    #: Refuse clients without a certificate from `client_ca`.
    require_client_cert: bool = False
    #: For clients reading this config (dialogctl), never used by the server: the CAs that sign
    #: the server certificate (None: the system's roots), and a client certificate and key for
    #: mutual TLS. Paths, read when dialogctl connects, so that a server never fails to start
    #: over a file only dialogctl needs.
    server_ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint (prometheus-client's HTTP server; path /metrics)."""

    #: `host:port` it listens on (port 0 picks a free one); None: no endpoint.
    listen: str | None = DEFAULT_METRICS_LISTEN

    def for_worker(self, index: int) -> MetricsConfig:
        """The endpoint of worker `index` of several server processes: port + index (0 stays 0)."""
        if self.listen is None or index == 0:
            return self
        host, port = split_host_port(self.listen)
        return MetricsConfig(f"{host}:{port + index}" if port else self.listen)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging (stderr): format, level and the per-RPC lines."""

    #: `json` (one object per line), `text` (for people), or `auto`: text on a terminal, else JSON.
    format: str = "auto"
    #: Level of the root logger (DEBUG, INFO, WARNING, ERROR).
    level: str = "INFO"
    #: One line per RPC (logger `server.rpc`, level INFO): method, status, duration, shard.
    rpc: bool = True


@dataclass(frozen=True, slots=True)
class ActivityConfig:
    """Recent-activity counts (server.observability.activity): what hotspots and the rebalancer read."""

    #: Seconds between flushes of each server process's counts to the shards' activity tables.
    flush_seconds: float = 10.0
    #: Length of one stored window of counts, in seconds (the finest time resolution of a rate).
    window_seconds: float = 60.0
    #: Seconds the windows are kept (the longest `--window` of `dialogctl hotspots`).
    retention_seconds: float = 3600.0
    #: Pairs one process tracks per flush period (a pair above 1/(max_pairs + 1) of the period's
    #: calls is always among them); memory is bounded by it and the 4096 buckets per shard.
    max_pairs: int = 512


#: What the rebalancer weighs shards and pairs by.
REBALANCE_MEASURES = ("rate", "size")


@dataclass(frozen=True, slots=True)
class RebalanceConfig:
    """The automatic rebalancer (server.moves.rebalancer; decisions in server.routing.rebalance)."""

    #: Run it (one server of the cluster acts, chosen by an advisory lock); `DIALOG_REBALANCE_AUTO`.
    auto: bool = False
    #: Seconds between its rounds; `DIALOG_REBALANCE_INTERVAL`.
    interval: float = 60.0
    #: `rate`: messages written per second over `window` (recent-activity tables); `size`: stored
    #: messages (PostgreSQL's estimate per shard, an index count per candidate pair).
    by: str = "rate"
    #: Seconds of activity a round weighs.
    window: float = 600.0
    #: Act when the heaviest shard carries more than this times the mean.
    threshold: float = 1.3
    #: Stop moving once the heaviest shard is within this times the mean (below `threshold`: the
    #: band between the two is the hysteresis).
    settle: float = 1.1
    #: Make moves only if together they lower the heaviest shard's load by at least this fraction.
    min_improvement: float = 0.1
    #: Pairs (the heaviest by activity) per shard a round considers moving.
    candidates: int = 50
    #: Most moves in any hour (over all servers: counted in the control database's decisions).
    max_moves_per_hour: int = 30
    #: Most moves in one round.
    max_moves_per_round: int = 5
    #: Rows moved per second, at most, averaged over a round's moves (it waits between moves).
    rows_per_second: float = 5000.0
    #: Seconds a pair the rebalancer moved stays where it put it.
    cooldown: float = 3600.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the server needs, validated."""

    shards: tuple[ShardConfig, ...]
    #: Database of the control tables (`shard_map`).
    control_dsn: str
    auth: AuthConfig
    #: Key that signs page tokens so they cannot be forged.
    page_token_secret: bytes
    listen: str = DEFAULT_LISTEN
    pool: PoolConfig = field(default_factory=PoolConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    #: TLS for the listening port; None serves plaintext.
    tls: TlsConfig | None = None
    #: Serve gRPC server reflection (grpcurl list/describe).
    reflection: bool = True
    #: Seconds in-flight RPCs get to finish on shutdown.
    shutdown_grace_seconds: float = 10.0
    #: Close each client connection after about this many seconds (0: never), so that clients
    #: reconnect and the kernel spreads their connections over the workers anew.
    max_connection_age_seconds: float = 0.0
    #: Server processes sharing the listening port (SO_REUSEPORT); `dialog-server --workers` wins.
    workers: int = 1
    #: Pin worker i to the i-th CPU this process may use (server.runtime.affinity): for a machine that
    #: runs one server only. `dialog-server --pin-workers` turns it on too.
    pin_workers: bool = False
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    activity: ActivityConfig = field(default_factory=ActivityConfig)
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)

    @property
    def num_shards(self) -> int:
        return len(self.shards)


def describe_dsn(dsn: str) -> str:
    """`host:port/dbname` of a DSN, never its password; `a:5432,b:5433/dbname` for several hosts
    (libpq's multi-host DSNs: `host=a,b port=5432,5433`, or a single port for all)."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return urlsplit(dsn).hostname or "<unparsable dsn>"
    hosts = [h.strip() or "localhost" for h in str(params.get("host") or "localhost").split(",")]
    ports = [p.strip() or "5432" for p in str(params.get("port") or "5432").split(",")]
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):  # libpq refuses such a DSN too; show it as written
        return f"{params.get('host')}:{params.get('port')}/{params.get('dbname', '')}"
    where = ",".join(f"{h}:{p}" for h, p in zip(hosts, ports, strict=True))
    return f"{where}/{params.get('dbname', '')}"


def split_host_port(address: str) -> tuple[str, int]:
    """`("127.0.0.1", 9464)` from `127.0.0.1:9464`, `("::", 9464)` from `[::]:9464`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"address {address!r} must be HOST:PORT with a port in 0..65535")
    return host.removeprefix("[").removesuffix("]"), int(port)


def render_config(
    *,
    shard_dsns: Sequence[str],
    listen: str,
    auth: Mapping[str, str],
    control_dsn: str | None = None,
    tables: Sequence[str] | None = None,
    settings: Mapping[str, object] | None = None,
    sections: Mapping[str, Mapping[str, object]] | None = None,
    comment: str | None = None,
) -> str:
    """The TOML text `load_config` reads back: shard i on `shard_dsns[i]`, table `messages_i` by default.

    Tools that start a server (the dev stack, the local cluster, the benchmark, tests) write
    their config through this one function, so the file format has one writer beside its reader.
    """
    lines = [f"# {comment}"] if comment else []
    lines.append(f"listen = {_toml(listen)}")
    if control_dsn is not None:
        lines.append(f"control_dsn = {_toml(control_dsn)}")
    lines += [f"{key} = {_toml(value)}" for key, value in (settings or {}).items()]
    for name, values in {"auth": auth, **(sections or {})}.items():
        lines += ["", f"[{name}]", *(f"{key} = {_toml(value)}" for key, value in values.items())]
    for shard_id, dsn in enumerate(shard_dsns):
        table = tables[shard_id] if tables is not None else f"messages_{shard_id}"
        lines += ["", "[[shards]]", f"id = {shard_id}", f"dsn = {_toml(dsn)}", f"table = {_toml(table)}"]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string is a valid TOML basic string (same quotes and escapes).
    return json.dumps(str(value))


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Read the TOML file (if any) and the environment into a validated ServerConfig."""
    env = os.environ if environ is None else environ
    if path is None and env.get("DIALOG_CONFIG"):
        path = Path(env["DIALOG_CONFIG"])
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_mapping(data, env, base_dir=path.parent if path else Path.cwd())


def config_from_mapping(data: Mapping[str, Any], env: Mapping[str, str], *, base_dir: Path) -> ServerConfig:
    """Validate parsed TOML plus the environment; every problem is a ConfigError."""
    try:
        return _build(data, env, base_dir)
    except ConfigError:
        raise
    except (ValueError, TypeError, AttributeError) as exc:
        # A value of the wrong type ("soon" for a number, a string for a table, ...).
        raise ConfigError(f"invalid configuration value: {exc}") from None


def _build(data: Mapping[str, Any], env: Mapping[str, str], base_dir: Path) -> ServerConfig:
    shards = _shards(data, env)
    auth = _auth(dict(data.get("auth", {})), env, base_dir)
    page_secret_text = env.get("DIALOG_PAGE_TOKEN_SECRET", data.get("page_token_secret"))
    if page_secret_text:
        page_secret = page_secret_text.encode()
    elif auth.jwt_secret is not None:
        page_secret = hmac.new(auth.jwt_secret, b"dialog-shard page tokens", hashlib.sha256).digest()
    else:
        raise ConfigError(
            "no page token key: set page_token_secret or DIALOG_PAGE_TOKEN_SECRET "
            "(it cannot be derived when only public JWT keys are configured)"
        )
    pool = PoolConfig(**_known(data.get("pool", {}), PoolConfig, "pool"))
    limits = _limits(data.get("limits", {}), env)
    if pool.min_size < 0 or pool.max_size < max(1, pool.min_size):
        raise ConfigError(f"pool sizes are inconsistent: min_size={pool.min_size}, max_size={pool.max_size}")
    if pool.max_write_batch < 1:
        raise ConfigError(
            f"pool.max_write_batch must be at least 1 (1 disables batching), got {pool.max_write_batch}"
        )
    if not 0 <= pool.max_write_batch_wait_ms <= 1000:
        raise ConfigError(
            "pool.max_write_batch_wait_ms must be between 0 and 1000 (0 never waits), "
            f"got {pool.max_write_batch_wait_ms}"
        )
    _check_limits(limits)
    resilience = _resilience(data.get("resilience", {}))
    max_connection_age = float(data.get("max_connection_age_seconds", 0.0))
    if max_connection_age < 0:
        raise ConfigError(f"max_connection_age_seconds must be 0 (never) or more, got {max_connection_age}")
    activity = _activity(data.get("activity", {}))
    rebalance = _rebalance(data.get("rebalance", {}), env)
    if rebalance.window > activity.retention_seconds:
        raise ConfigError(
            f"rebalance.window ({rebalance.window:g} s) must be at most activity.retention_seconds "
            f"({activity.retention_seconds:g} s): older activity is pruned"
        )
    return ServerConfig(
        shards=shards,
        control_dsn=_control_dsn(env.get("DIALOG_CONTROL_DSN") or data.get("control_dsn") or shards[0].dsn),
        auth=auth,
        page_token_secret=page_secret,
        listen=env.get("DIALOG_LISTEN", data.get("listen", DEFAULT_LISTEN)),
        pool=pool,
        limits=limits,
        resilience=resilience,
        tls=_tls(data.get("tls"), base_dir),
        reflection=_bool(env.get("DIALOG_REFLECTION", data.get("reflection", True))),
        shutdown_grace_seconds=float(data.get("shutdown_grace_seconds", 10.0)),
        max_connection_age_seconds=max_connection_age,
        workers=_workers(env.get("DIALOG_WORKERS", data.get("workers", 1))),
        pin_workers=_bool(env.get("DIALOG_PIN_WORKERS", data.get("pin_workers", False))),
        metrics=_metrics(data.get("metrics", {}), env),
        log=_log(data.get("log", {}), env),
        activity=activity,
        rebalance=rebalance,
        delivery=_delivery(data.get("delivery", {})),
        archive=_archive(data.get("archive", {}), env, base_dir),
    )


def _activity(section: Mapping[str, Any]) -> ActivityConfig:
    values = _known(section, ActivityConfig, "activity")
    activity = ActivityConfig(**values)
    if min(activity.flush_seconds, activity.window_seconds) <= 0 or activity.max_pairs < 1:
        raise ConfigError("activity.flush_seconds and window_seconds must be positive, max_pairs at least 1")
    if activity.retention_seconds < activity.window_seconds:
        raise ConfigError("activity.retention_seconds must be at least activity.window_seconds")
    return activity


def _rebalance(section: Mapping[str, Any], env: Mapping[str, str]) -> RebalanceConfig:
    values = _known(section, RebalanceConfig, "rebalance")
    if env.get("DIALOG_REBALANCE_AUTO"):
        values["auto"] = env["DIALOG_REBALANCE_AUTO"]
    if env.get("DIALOG_REBALANCE_INTERVAL"):
        values["interval"] = float(env["DIALOG_REBALANCE_INTERVAL"])
    if "auto" in values:
        values["auto"] = _bool(values["auto"])
    rebalance = RebalanceConfig(**values)
    if rebalance.by not in REBALANCE_MEASURES:
        raise ConfigError(
            f"rebalance.by must be one of {', '.join(REBALANCE_MEASURES)}, got {rebalance.by!r}"
        )
    if min(rebalance.interval, rebalance.window, rebalance.rows_per_second) <= 0:
        raise ConfigError("rebalance.interval, window and rows_per_second must be positive")
    if not 1.0 <= rebalance.settle <= rebalance.threshold:
        raise ConfigError(
            f"rebalance.settle must be in 1..threshold ({rebalance.threshold:g}), got {rebalance.settle:g}: "
            "moves stop within settle x the mean and start above threshold x the mean"
        )
    if not 0 <= rebalance.min_improvement < 1:
        raise ConfigError(f"rebalance.min_improvement must be in [0, 1), got {rebalance.min_improvement:g}")
    if min(rebalance.candidates, rebalance.max_moves_per_round) < 1 or rebalance.max_moves_per_hour < 0:
        raise ConfigError(
            "rebalance.candidates and max_moves_per_round must be at least 1, max_moves_per_hour >= 0"
        )
    if rebalance.cooldown < 0:
        raise ConfigError("rebalance.cooldown must be >= 0")
    return rebalance


def _delivery(section: Mapping[str, Any]) -> DeliveryConfig:
    delivery = DeliveryConfig(**_known(section, DeliveryConfig, "delivery"))
    if delivery.stream_buffer < 1 or delivery.max_streams < 0:
        raise ConfigError("delivery.stream_buffer must be at least 1 and delivery.max_streams at least 0")
    if min(delivery.retention_seconds, delivery.poll_interval, delivery.prune_interval) <= 0:
        raise ConfigError(
            "delivery.retention_seconds, poll_interval and prune_interval must be more than 0 seconds"
        )
    return delivery


def _control_dsn(dsn: object) -> str:
    try:
        conninfo_to_dict(str(dsn))
    except Exception:
        raise ConfigError("control_dsn is not a valid PostgreSQL connection string") from None
    return str(dsn)


def _metrics(section: Mapping[str, Any], env: Mapping[str, str]) -> MetricsConfig:
    unknown = set(section) - {"listen", "enabled"}
    if unknown:
        raise ConfigError(f"unknown keys in [metrics]: {', '.join(sorted(unknown))}")
    listen = env.get("DIALOG_METRICS_LISTEN", section.get("listen", DEFAULT_METRICS_LISTEN))
    if not _bool(section.get("enabled", True)) or str(listen).strip().lower() in {"", "off", "none"}:
        return MetricsConfig(listen=None)
    split_host_port(str(listen))
    return MetricsConfig(listen=str(listen))


def _log(section: Mapping[str, Any], env: Mapping[str, str]) -> LogConfig:
    values = _known(section, LogConfig, "log")
    config = LogConfig(
        format=str(env.get("DIALOG_LOG_FORMAT", values.get("format", "auto"))).lower(),
        level=str(env.get("DIALOG_LOG_LEVEL", values.get("level", "INFO"))).upper(),
        rpc=_bool(env.get("DIALOG_LOG_RPC", values.get("rpc", True))),
    )
    if config.format not in LOG_FORMATS:
        raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {config.format!r}")
    if config.level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"log level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {config.level!r}")
    return config


def _workers(value: object) -> int:
    workers = int(str(value))
    if not 1 <= workers <= 256:
        raise ConfigError(f"workers must be in 1..256, got {workers}")
    return workers


def _shards(data: Mapping[str, Any], env: Mapping[str, str]) -> tuple[ShardConfig, ...]:
    if env.get("DIALOG_SHARD_DSNS"):
        dsns = [d.strip() for d in env["DIALOG_SHARD_DSNS"].split(",") if d.strip()]
        count = int(env.get("DIALOG_NUM_SHARDS", len(dsns) if len(dsns) > 1 else DEFAULT_NUM_SHARDS))
        if len(dsns) == 1:
            dsns *= count
        if len(dsns) != count:
            raise ConfigError(f"DIALOG_SHARD_DSNS lists {len(dsns)} DSNs but DIALOG_NUM_SHARDS is {count}")
        entries: list[dict[str, Any]] = [{"id": i, "dsn": d} for i, d in enumerate(dsns)]
    else:
        entries = [dict(e) for e in data.get("shards", [])]
    if not entries:
        raise ConfigError(
            "no shards configured: add [[shards]] entries to the config file or set DIALOG_SHARD_DSNS"
        )
    shards: list[ShardConfig] = []
    for entry in entries:
        try:
            shard_id = int(entry["id"])
            dsn = str(entry["dsn"])
        except KeyError as exc:
            raise ConfigError(f"every [[shards]] entry needs 'id' and 'dsn'; missing {exc}") from None
        table = str(entry.get("table", f"messages_{shard_id}"))
        _check_table_name(shard_id, table)
        try:
            conninfo_to_dict(dsn)
        except Exception:
            raise ConfigError(f"shard {shard_id}: DSN is not a valid PostgreSQL connection string") from None
        replicas = entry.get("replica_dsns", [])
        if not isinstance(replicas, list):
            raise ConfigError(f"shard {shard_id}: replica_dsns must be a list of DSNs")
        for replica in replicas:
            try:
                conninfo_to_dict(str(replica))
            except Exception:
                raise ConfigError(
                    f"shard {shard_id}: a replica DSN is not a valid PostgreSQL connection string"
                ) from None
        shards.append(
            ShardConfig(shard_id=shard_id, dsn=dsn, table=table, replica_dsns=tuple(str(r) for r in replicas))
        )
    shards.sort(key=lambda s: s.shard_id)
    ids = [s.shard_id for s in shards]
    if ids != list(range(len(shards))):
        raise ConfigError(f"shard ids must be 0..{len(shards) - 1} without gaps or repeats, got {ids}")
    seen: set[tuple[str, str]] = set()
    for s in shards:
        key = (s.location, s.table)
        if key in seen:
            raise ConfigError(f"shard {s.shard_id} reuses table {s.table} on {s.location} of another shard")
        seen.add(key)
    return tuple(shards)


_AUTH_KEYS = frozenset(
    {
        "algorithms",
        "jwt_secret",
        "jwt_secret_file",
        "public_key_file",
        "jwks_file",
        "issuer",
        "audience",
        "leeway_seconds",
        "admin_claim",
        "max_token_lifetime_seconds",
        "max_admin_token_lifetime_seconds",
        "revocation_file",
    }
)


def _check_table_name(shard_id: int, table: str) -> None:
    """A name PostgreSQL keeps as written, with room for the names derived from it."""
    if not _TABLE_NAME.fullmatch(table):
        raise ConfigError(
            f"shard {shard_id}: table name {table!r} must be lowercase ASCII letters, digits and "
            "underscores, not starting with a digit"
        )
    if len(table) > MAX_TABLE_NAME_CHARS:
        raise ConfigError(
            f"shard {shard_id}: table name {table!r} is {len(table)} characters, longer than "
            f"{MAX_TABLE_NAME_CHARS}: PostgreSQL cuts identifiers at 63 bytes, and names derived from "
            f"the table (up to {table[:8]}...{LONGEST_TABLE_SUFFIX}) must fit whole"
        )


def _auth(auth_data: dict[str, Any], env: Mapping[str, str], base_dir: Path) -> AuthConfig:
    # A misspelt key (`revocations_file`) must not silently leave a protection off.
    unknown = set(auth_data) - _AUTH_KEYS
    if unknown:
        raise ConfigError(f"unknown keys in [auth]: {', '.join(sorted(unknown))}")
    if env.get("DIALOG_JWT_ALGORITHMS"):
        algorithms = tuple(a.strip() for a in env["DIALOG_JWT_ALGORITHMS"].split(",") if a.strip())
    else:
        algorithms = tuple(str(a) for a in auth_data.get("algorithms", ("HS256",)))
    supported = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS
    unsupported = [a for a in algorithms if a not in supported]
    if not algorithms or unsupported:
        raise ConfigError(
            f"[auth] algorithms must be some of {', '.join(sorted(supported))}; "
            f"got {', '.join(unsupported) or 'none'}"
        )
    public_key_file = _path(env.get("DIALOG_JWT_PUBLIC_KEY_FILE", auth_data.get("public_key_file")), base_dir)
    jwks_file = _path(env.get("DIALOG_JWKS_FILE", auth_data.get("jwks_file")), base_dir)
    asymmetric = [a for a in algorithms if a in ASYMMETRIC_ALGORITHMS]
    if asymmetric and (public_key_file is None) == (jwks_file is None):
        raise ConfigError(
            f"[auth] algorithms include {', '.join(asymmetric)}: "
            "set exactly one of public_key_file and jwks_file"
        )
    if not asymmetric and (public_key_file or jwks_file):
        raise ConfigError("[auth] public_key_file/jwks_file need an RS*, PS* or ES* algorithm in algorithms")
    issuer = str(env.get("DIALOG_JWT_ISSUER", auth_data.get("issuer")) or "") or None
    audience = str(env.get("DIALOG_JWT_AUDIENCE", auth_data.get("audience")) or "") or None
    if (public_key_file or jwks_file) and (issuer is None or audience is None):
        missing = " and ".join(n for n, v in (("issuer", issuer), ("audience", audience)) if v is None)
        raise ConfigError(
            f"[auth] {'jwks_file' if jwks_file else 'public_key_file'} needs {missing}: set [auth] issuer "
            "and audience (or DIALOG_JWT_ISSUER, DIALOG_JWT_AUDIENCE) to the iss and aud your issuer "
            "puts in its tokens, so that tokens it signs for other services are refused here"
        )
    leeway = float(auth_data.get("leeway_seconds", 30.0))
    if not 0 <= leeway <= MAX_LEEWAY_SECONDS:
        raise ConfigError(
            f"[auth] leeway_seconds must be in 0..{MAX_LEEWAY_SECONDS:g} (clock skew, not a lifetime), "
            f"got {leeway:g}"
        )
    lifetimes = {
        name: float(auth_data.get(name, default))
        for name, default in (
            ("max_token_lifetime_seconds", DEFAULT_MAX_TOKEN_LIFETIME),
            ("max_admin_token_lifetime_seconds", DEFAULT_MAX_ADMIN_TOKEN_LIFETIME),
        )
    }
    for name, seconds in lifetimes.items():
        if not (0 <= seconds < float("inf")):
            raise ConfigError(
                f"[auth] {name} must be a number of seconds >= 0 (0: no limit), got {seconds:g}"
            )
    revocation_file = _path(env.get("DIALOG_JWT_REVOCATION_FILE", auth_data.get("revocation_file")), base_dir)
    needs_secret = any(a in HMAC_ALGORITHMS for a in algorithms)
    return AuthConfig(
        jwt_secret=_secret(auth_data, env, base_dir) if needs_secret else None,
        algorithms=algorithms,
        public_key_file=public_key_file,
        jwks_file=jwks_file,
        issuer=issuer,
        audience=audience,
        leeway_seconds=leeway,
        admin_claim=str(auth_data.get("admin_claim", "admin")),
        max_token_lifetime_seconds=lifetimes["max_token_lifetime_seconds"],
        max_admin_token_lifetime_seconds=lifetimes["max_admin_token_lifetime_seconds"],
        revocation_file=revocation_file,
    )


def _limits(section: Mapping[str, Any], env: Mapping[str, str]) -> LimitsConfig:
    values = _known(section, LimitsConfig, "limits")
    for name in _LIMITS_FROM_ENV:
        text = env.get(f"DIALOG_{name.upper()}")
        if text:
            values[name] = float(text) if name.endswith("per_second") else int(text)
    return LimitsConfig(**values)


def _check_limits(limits: LimitsConfig) -> None:
    if not 0 < limits.default_page_size <= limits.max_page_size:
        raise ConfigError("limits.default_page_size must be in 1..limits.max_page_size")
    if limits.send_rate_per_second < 0 or (limits.send_rate_per_second > 0 and limits.send_burst < 1):
        raise ConfigError("limits.send_rate_per_second must be >= 0 (0 disables) and send_burst >= 1")
    if limits.read_rate_per_second < 0 or (limits.read_rate_per_second > 0 and limits.read_burst < 1):
        raise ConfigError("limits.read_rate_per_second must be >= 0 (0 disables) and read_burst >= 1")
    if limits.max_tracked_users < 1:
        raise ConfigError("limits.max_tracked_users must be at least 1")
    # One message of the longest valid text always fits a page; a page always fits what gRPC sends.
    lowest, highest = limits.max_text_bytes + 1024, MAX_SEND_BYTES - _RESPONSE_HEADROOM
    if not lowest <= limits.max_response_bytes <= highest:
        raise ConfigError(
            f"limits.max_response_bytes must be in {lowest}..{highest} (at least max_text_bytes + 1024, "
            f"at most gRPC's default 4 MiB receive limit less {_RESPONSE_HEADROOM}), "
            f"got {limits.max_response_bytes}"
        )
    if limits.max_concurrent_rpcs < 1:
        raise ConfigError("limits.max_concurrent_rpcs must be at least 1")
    # Room for the longest valid text plus ids and request_id, so a valid request is never refused.
    if limits.max_request_bytes < limits.max_text_bytes + 1024:
        raise ConfigError(
            f"limits.max_request_bytes ({limits.max_request_bytes}) must be at least "
            f"limits.max_text_bytes + 1024 ({limits.max_text_bytes + 1024})"
        )
    if limits.max_metadata_bytes < 4096:
        raise ConfigError("limits.max_metadata_bytes must be at least 4096 (bearer tokens travel there)")


def _archive(section: Mapping[str, Any], env: Mapping[str, str], base_dir: Path) -> ArchiveConfig:
    values = _known(section, ArchiveConfig, "archive")
    for key in ("url", "endpoint_url", "older_than"):
        if env.get(f"DIALOG_ARCHIVE_{key.upper()}"):
            values[key] = env[f"DIALOG_ARCHIVE_{key.upper()}"]
    url = values.get("url")
    if url and "://" not in str(url):
        values["url"] = str(base_dir / Path(str(url)).expanduser())
    archive = ArchiveConfig(**values)
    if archive.older_than is not None:
        try:
            parse_duration(archive.older_than)
        except ValueError as exc:
            raise ConfigError(f"archive.older_than: {exc}") from None
    if min(archive.batch_rows, archive.row_group_rows, archive.max_files_per_part) < 1:
        raise ConfigError(
            "archive.batch_rows, archive.row_group_rows and archive.max_files_per_part must be at least 1"
        )
    if archive.manifest_max_age <= 0 or archive.schedule_interval <= 0:
        raise ConfigError("archive.manifest_max_age and archive.schedule_interval must be positive")
    return archive


def _resilience(section: Mapping[str, Any]) -> ResilienceConfig:
    values = _known(section, ResilienceConfig, "resilience")
    for flag in ("require_all_shards", "replica_reads"):
        if flag in values:
            values[flag] = _bool(values[flag])
    resilience = ResilienceConfig(**values)
    if min(resilience.failure_threshold, resilience.retry_attempts, resilience.hung_after_probes) < 1:
        raise ConfigError(
            "resilience.failure_threshold, retry_attempts and hung_after_probes must be at least 1"
        )
    durations = {
        name: getattr(resilience, name)
        for name in (
            "open_seconds",
            "probe_interval",
            "probe_timeout",
            "statement_timeout",
            "reconnect_timeout",
        )
    }
    if any(float(v) <= 0 for v in durations.values()):
        raise ConfigError(
            "resilience durations must be positive: " + ", ".join(f"{k}={v}" for k, v in durations.items())
        )
    if resilience.retry_backoff < 0 or resilience.retry_backoff_max < resilience.retry_backoff:
        raise ConfigError("resilience.retry_backoff must be >= 0 and <= resilience.retry_backoff_max")
    if resilience.replica_max_lag < 0:
        raise ConfigError("resilience.replica_max_lag must be >= 0")
    if resilience.moving_wait < 0:
        raise ConfigError("resilience.moving_wait must be >= 0 (0 answers DIALOG_MOVING at once)")
    if resilience.move_resume_after < 0:
        raise ConfigError("resilience.move_resume_after must be >= 0 (0 turns resuming off)")
    return resilience


def _tls(section: Mapping[str, Any] | None, base_dir: Path) -> TlsConfig | None:
    if section is None:
        return None
    allowed = {
        "cert_file",
        "key_file",
        "client_ca_file",
        "require_client_cert",
        "server_ca_file",
        "client_cert_file",
        "client_key_file",
    }
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"unknown keys in [tls]: {', '.join(sorted(unknown))}")
    cert_file = _path(section.get("cert_file"), base_dir)
    key_file = _path(section.get("key_file"), base_dir)
    if cert_file is None or key_file is None:
        raise ConfigError("[tls] needs both cert_file and key_file")
    ca_file = _path(section.get("client_ca_file"), base_dir)
    require = _bool(section.get("require_client_cert", False))
    if require and ca_file is None:
        raise ConfigError("[tls] require_client_cert needs client_ca_file (the CAs of client certificates)")
    client_cert_file = _path(section.get("client_cert_file"), base_dir)
    client_key_file = _path(section.get("client_key_file"), base_dir)
    if (client_cert_file is None) != (client_key_file is None):
        raise ConfigError("[tls] client_cert_file and client_key_file go together")
    return TlsConfig(
        cert_chain=read_pem(cert_file, "[tls] cert_file"),
        private_key=read_pem(key_file, "[tls] key_file"),
        client_ca=read_pem(ca_file, "[tls] client_ca_file") if ca_file else None,
        require_client_cert=require,
        server_ca_file=_path(section.get("server_ca_file"), base_dir),
        client_cert_file=client_cert_file,
        client_key_file=client_key_file,
    )


def read_pem(path: Path, what: str) -> bytes:
    """The contents of a PEM file, or a ConfigError naming `what` and why it cannot be used."""
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in content:
        raise ConfigError(f"{what} {path} is not a PEM file")
    return content


def _path(value: object, base_dir: Path) -> Path | None:
    if value is None or value == "":
        return None
    path = Path(str(value))
    return path if path.is_absolute() else base_dir / path


def _secret(auth_data: Mapping[str, Any], env: Mapping[str, str], base_dir: Path) -> bytes:
    if env.get("DIALOG_JWT_SECRET"):
        return _strong(env["DIALOG_JWT_SECRET"].encode(), "DIALOG_JWT_SECRET")
    secret_file = env.get("DIALOG_JWT_SECRET_FILE", auth_data.get("jwt_secret_file"))
    if secret_file:
        path = Path(secret_file)
        path = path if path.is_absolute() else base_dir / path
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the JWT secret file {path}: {exc.strerror}") from None
        return _strong(secret, f"the file {path}")
    if auth_data.get("jwt_secret"):
        return _strong(str(auth_data["jwt_secret"]).encode(), "[auth] jwt_secret")
    raise ConfigError(
        "no JWT key configured: set DIALOG_JWT_SECRET(_FILE) or [auth] jwt_secret_file "
        "(`dialog-server --dev` generates one)"
    )


def _strong(secret: bytes, source: str) -> bytes:
    """`secret` if it is long enough to be a key rather than a password; never says what it is."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the JWT secret from {source} is shorter than {MIN_SECRET_BYTES} bytes ({len(secret)}): "
            "HS256 keys must be random and at least 32 bytes long (e.g. `openssl rand -base64 48`)"
        )
    return secret


def _known(section: Mapping[str, Any], cls: type, name: str) -> dict[str, Any]:
    allowed = {f.name for f in fields(cls)}
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"unknown keys in [{name}]: {', '.join(sorted(unknown))}")
    return dict(section)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"1", "true", "yes", "on"}
