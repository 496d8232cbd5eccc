"""Conversions between storage records and dialog.v1 messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.storage.messages import StoredMessage


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def message_to_proto(message: StoredMessage) -> pb.Message:
    return pb.Message(
        message_id=str(message.message_id),
        from_user_id=message.from_user_id,
        to_user_id=message.to_user_id,
        text=message.text,
        create_time=timestamp(message.created_at),
    )
