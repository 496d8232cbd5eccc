"""The client's one exception type and the one place gRPC failures become it.

Exception tree::

    DialogShardError        any failed call: gRPC status code, message and decoded google.rpc details

The server sends AIP-193 rich errors (`google.rpc.Status` in the `grpc-status-details-bin`
trailer); `DialogShardError` decodes the three detail types it uses: `ErrorInfo` (reason, domain,
metadata), `BadRequest` (field violations) and `RetryInfo` (how long to wait before retrying).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field, from `google.rpc.BadRequest`."""

    #: Request field path, e.g. `text` or `page_size`.
    field: str
    #: What is wrong with it and what a valid value looks like.
    description: str


class DialogShardError(Exception):
    """A call to dialog-shard failed; `code` is the gRPC status, the rest comes from its details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        #: The gRPC status code, e.g. `grpc.StatusCode.INVALID_ARGUMENT`.
        self.code = code
        #: The status message, meant for developers.
        self.message = message
        #: `ErrorInfo.reason` (UPPER_SNAKE, e.g. `REQUEST_ID_REUSED`), or "" without ErrorInfo.
        self.reason = reason
        #: `ErrorInfo.domain` (`dialog-shard` for the server's own errors).
        self.domain = domain
        #: `ErrorInfo.metadata`, e.g. `{"shard_id": "2"}`.
        self.metadata: dict[str, str] = dict(metadata or {})
        #: `BadRequest.field_violations`: every invalid field at once.
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        #: `RetryInfo.retry_delay` in seconds, when the server said how long to wait.
        self.retry_delay = retry_delay
        #: Attempts made before giving up, retries included (0: refused before sending).
        self.attempts = attempts

    def __repr__(self) -> str:
        return (
            f"DialogShardError({self.code.name}, {self.message!r}, reason={self.reason!r}, "
            f"attempts={self.attempts})"
        )


def error_from_rpc(exc: grpc.RpcError, *, attempts: int = 1) -> DialogShardError:
    """Map a failed call (sync, aio or grpc_testing) to DialogShardError with its decoded details."""
    if not isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return DialogShardError(grpc.StatusCode.UNKNOWN, str(exc), attempts=attempts)
    error = DialogShardError(exc.code(), exc.details() or "", attempts=attempts)
    try:
        status: status_pb2.Status | None = rpc_status.from_call(exc)
    except ValueError:
        # The details trailer contradicts the status (a proxy rewrote one of them): keep the status.
        status = None
    if status is None:
        return error
    violations: list[FieldViolation] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            error.reason, error.domain, error.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Unpack(bad):
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Unpack(retry):
            error.retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
    error.field_violations = tuple(violations)
    return error


_Request = TypeVar("_Request", bound=Message)


def build_request(message_type: type[_Request], /, **fields: Any) -> _Request:
    """The request message, or DialogShardError(INVALID_ARGUMENT) when a value cannot be encoded.

    E.g. a user id beyond int64 or a str where an int belongs: the call fails like any other,
    with the offending fields named, before anything is sent.
    """
    try:
        return message_type(**fields)
    except (ValueError, TypeError):
        pass
    violations = []
    for name, value in fields.items():
        try:
            message_type(**{name: value})
        except (ValueError, TypeError) as exc:
            violations.append(FieldViolation(name, f"cannot be encoded ({exc}): got {value!r}"))
    error = DialogShardError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "; ".join(f"{v.field}: {v.description}" for v in violations) or "the request cannot be encoded",
        reason="CLIENT_INVALID_ARGUMENT",
        attempts=0,
    )
    error.field_violations = tuple(violations)
    raise error
