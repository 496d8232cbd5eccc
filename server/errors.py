"""Domain errors and the one place that turns them into gRPC statuses.

Exception tree::

    ServiceError                 any failure a caller should see, with a gRPC code
    ├── InvalidArgument          INVALID_ARGUMENT + google.rpc.BadRequest field violations
    ├── Unauthenticated          UNAUTHENTICATED: missing, malformed, expired or unverifiable token
    ├── PermissionDenied         PERMISSION_DENIED: authenticated, but not allowed
    ├── NotFound                 NOT_FOUND
    ├── AlreadyExists            ALREADY_EXISTS (a reused request_id with other content)
    ├── FailedPrecondition       FAILED_PRECONDITION: the system is not in a state that allows it
    ├── ResourceExhausted        RESOURCE_EXHAUSTED + google.rpc.RetryInfo: over a rate limit; retry later
    ├── ShardUnavailable         UNAVAILABLE + google.rpc.RetryInfo: a shard's database cannot be reached
    │   └── ControlUnavailable   UNAVAILABLE + RetryInfo, reason CONTROL_UNAVAILABLE: the control database
    ├── DialogMoving             UNAVAILABLE + google.rpc.RetryInfo: the dialog is moving between shards
    ├── DeadlineExceeded         DEADLINE_EXCEEDED: the call's deadline passed while a shard was working
    ├── OutOfRange               OUT_OF_RANGE: a resume position older than the server keeps
    ├── ServerStopping           UNAVAILABLE + google.rpc.RetryInfo: this server process is shutting down
    └── InternalError            INTERNAL: a bug; details only in the server log

    StartupError                 the server cannot start; `dialog-server` prints the message and exits 2
    ├── ConfigError              (server.config) the configuration or a key file it names is wrong
    ├── DatabaseStartupError     (server.storage.pools) a shard or the control database cannot be used
    ├── EmbeddedPostgresError    (server.dev.embedded_pg) the `--dev` PostgreSQL cannot be set up or run
    ├── EventLoopError           (server.runtime.eventloop) the requested event loop is not available
    └── ListenError              (server.runtime.supervisor) the listen address cannot be bound

Startup errors are not statuses: they stop the process before it serves, with a message that
names what to fix, on one line.

Every status carries a `google.rpc.ErrorInfo` with an UPPER_SNAKE `reason` and the
domain `dialog-shard`, per AIP-193. Messages are for developers: they say what
was wrong and what to do, and never contain DSNs, SQL or stack traces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "dialog-shard"


class StartupError(Exception):
    """The server cannot start; the message says what to fix, on one line, for the operator."""


class ServiceError(Exception):
    """A failure with a gRPC status code, an ErrorInfo reason and a message for the caller."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[object]:
        """Extra google.rpc detail messages besides ErrorInfo."""
        return []


class FieldViolation:
    """One invalid request field (AIP-193 BadRequest.FieldViolation)."""

    __slots__ = ("description", "field")

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description

    def __repr__(self) -> str:
        return f"FieldViolation({self.field!r}, {self.description!r})"


class InvalidArgument(ServiceError):
    """The request is malformed; the field violations say which fields and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self, violations: Sequence[FieldViolation], *, reason: str | None = None, message: str | None = None
    ) -> None:
        message = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message, reason=reason)
        self.violations = list(violations)

    def details(self) -> list[object]:
        if not self.violations:
            return []
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
        ]


class Unauthenticated(ServiceError):
    """The call carries no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(ServiceError):
    """The named resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """The resource (or idempotency key) exists already with other content."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    """The system is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def unavailable_details(retry_after_seconds: float) -> list[object]:
    """The details of an UNAVAILABLE answer: a RetryInfo asking to wait `retry_after_seconds`."""
    return [_retry_info(retry_after_seconds)]


class ResourceExhausted(ServiceError):
    """The caller is over a limit; RetryInfo says how long to wait before trying again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[object]:
        return [_retry_info(self.retry_after_seconds)]


class ShardUnavailable(ServiceError):
    """A shard's database cannot be reached right now; the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "SHARD_UNAVAILABLE"

    def __init__(self, shard_id: int, cause: str, *, retry_after_seconds: float = 1.0) -> None:
        super().__init__(
            f"shard {shard_id} is unavailable ({cause}); retry later",
            metadata={"shard_id": str(shard_id)},
        )
        self.shard_id = shard_id
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[object]:
        return [_retry_info(self.retry_after_seconds)]


#: The shard id `ShardUnavailable.of` and the gates use for the control database (shard_map,
#: moves, the layout), which is no shard.
CONTROL_SHARD = -1


class ControlUnavailable(ShardUnavailable):
    """The control database cannot be reached: overrides, moves and reshards wait; messages do not."""

    default_reason = "CONTROL_UNAVAILABLE"

    def __init__(self, cause: str, *, retry_after_seconds: float = 1.0) -> None:
        ServiceError.__init__(
            self,
            f"the control database is unavailable ({cause}): overrides, moves and reshards cannot be "
            "changed until it is back (sending and reading messages go on); retry later",
            metadata={"database": "control"},
        )
        self.shard_id = CONTROL_SHARD
        self.retry_after_seconds = retry_after_seconds


def unavailable(shard_id: int, cause: str, *, retry_after_seconds: float = 1.0) -> ShardUnavailable:
    """UNAVAILABLE for shard `shard_id`, or for the control database when it is CONTROL_SHARD."""
    if shard_id == CONTROL_SHARD:
        return ControlUnavailable(cause, retry_after_seconds=retry_after_seconds)
    return ShardUnavailable(shard_id, cause, retry_after_seconds=retry_after_seconds)


class DialogMoving(ServiceError):
    """The dialog's messages are moving between shards; retrying after RetryInfo's delay is safe."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "DIALOG_MOVING"
    #: How long a move keeps writes of the moving dialog paused: the final catch-up copy,
    #: the routing flip and its NOTIFY reaching every server (normally well under a second).
    RETRY_AFTER_SECONDS = 0.2

    def __init__(self, shard_id: int) -> None:
        super().__init__(
            f"the dialog is moving away from shard {shard_id}; retry in a moment "
            "(SendMessage with the same request_id is safe to retry)",
            metadata={"shard_id": str(shard_id)},
        )
        self.shard_id = shard_id

    def details(self) -> list[object]:
        return [_retry_info(self.RETRY_AFTER_SECONDS)]


class DeadlineExceeded(ServiceError):
    """The RPC's deadline ran out before the shard answered (the statement was cancelled)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class OutOfRange(ServiceError):
    """A position the caller resumes from is older than what the server still keeps."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class ServerStopping(ServiceError):
    """This server process is shutting down; the call (a stream) may be resumed on another."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "SERVER_STOPPING"
    RETRY_AFTER_SECONDS = 0.5

    def details(self) -> list[object]:
        return [_retry_info(self.RETRY_AFTER_SECONDS)]


class InternalError(ServiceError):
    """A bug; the message says only that it happened and where to look."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


def to_grpc_status(error: ServiceError) -> grpc.Status:
    """Build the status sent to the caller: code, message, ErrorInfo and extra details."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    status = status_pb2.Status(code=_CODE_NUMBERS[error.code], message=error.message)
    for detail in (info, *error.details()):
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)  # type: ignore[no-any-return]


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.OUT_OF_RANGE: code_pb2.OUT_OF_RANGE,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNKNOWN: code_pb2.UNKNOWN,
}
