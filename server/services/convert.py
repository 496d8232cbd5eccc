"""Conversions between storage records and dialog.v1 messages."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.storage.messages import StoredMessage

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """`value` as a Timestamp (a naive datetime is taken as UTC, as Timestamp.FromDatetime does).

    Computed from the difference to the epoch: the same result as FromDatetime, without its
    per-call Python conversions (every message of every response goes through here).
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def message_to_proto(message: StoredMessage) -> pb.Message:
    return pb.Message(
        message_id=str(message.message_id),
        from_user_id=message.from_user_id,
        to_user_id=message.to_user_id,
        text=message.text,
        create_time=timestamp(message.created_at),
    )
