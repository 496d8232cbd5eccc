"""Conversions between storage records and dialog.v1 messages."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.storage.events import Event
from server.storage.ids import EPOCH
from server.storage.messages import PageRow, StoredMessage


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """`value` as a Timestamp (a naive datetime is taken as UTC, as Timestamp.FromDatetime does)."""
    ts = timestamp_pb2.Timestamp()
    set_timestamp(ts, value)
    return ts


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Set `target` to `value`: the same result as Timestamp.FromDatetime, from the difference to
    the epoch, without its per-call Python conversions (every message of every response goes
    through here)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def message_to_proto(message: StoredMessage) -> pb.Message:
    proto = pb.Message()
    fill_message(proto, message)
    return proto


def fill_message(target: pb.Message, message: StoredMessage | Event) -> None:
    """Set the fields of `target` (e.g. a response's own message field) from `message`."""
    _fill(
        target,
        str(message.message_id),
        message.from_user_id,
        message.to_user_id,
        message.text,
        message.created_at,
    )


def add_page(target: RepeatedCompositeFieldContainer[pb.Message], rows: Iterable[PageRow]) -> None:
    """Append a page's rows to a repeated field, built in place (no message built and then copied)."""
    add = target.add
    for row in rows:
        _fill(add(), *row)


def _fill(
    target: pb.Message, message_id: str, from_user_id: int, to_user_id: int, text: str, created_at: datetime
) -> None:
    """The one place that says how a stored message's values become a dialog.v1 Message."""
    target.message_id = message_id
    target.from_user_id = from_user_id
    target.to_user_id = to_user_id
    target.text = text
    set_timestamp(target.create_time, created_at)
