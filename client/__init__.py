"""Python client of dialog-shard: typed clients here, generated stubs in `client.gen`.

    from client import ChannelSecurity, DialogClient

    with DialogClient.connect("127.0.0.1:50051", ChannelSecurity(plaintext=True), token=get_token) as c:
        sent = c.send_message(1, 2, "hello")
        for message in c.iter_dialog(1, 2):
            ...
        for delivered in c.subscribe_messages(2):   # live, resuming by itself after a reconnect
            ...

`DialogClient` / `AdminClient` block; `AsyncDialogClient` / `AsyncAdminClient` are their asyncio
twins. Results are frozen dataclasses (`Message`, `DialogPage`, ...). Every call has a deadline
(the client's `timeout`, or a per-call `timeout=`) that bounds all its attempts; UNAVAILABLE is
retried with exponential backoff and jitter (honouring the server's RetryInfo), and SendMessage
reuses one generated `request_id` across attempts so a retry never stores a message twice.
Every failure is a `DialogShardError` carrying the gRPC code and the decoded details. Using a
closed client is a programming error (RuntimeError); a client that owns its channel and is never
closed warns (ResourceWarning).
"""

from client._admin import AdminClient, AsyncAdminClient
from client._channel import ChannelSecurity, TokenProvider, aio_channel, sync_channel
from client._dialog import AsyncDialogClient, DialogClient, new_request_id
from client._errors import DialogShardError, FieldViolation
from client._models import (
    ClusterStats,
    DeliveredMessage,
    DialogList,
    DialogPage,
    DialogSummary,
    Message,
    Order,
    OverridePage,
    PlacedMessage,
    PlacedMessagePage,
    SentMessage,
    ShardOverride,
    ShardResolution,
    ShardSource,
    ShardStats,
    UserErasure,
)
from client._retry import RetryPolicy

__all__ = [
    "AdminClient",
    "AsyncAdminClient",
    "AsyncDialogClient",
    "ChannelSecurity",
    "ClusterStats",
    "DeliveredMessage",
    "DialogClient",
    "DialogList",
    "DialogPage",
    "DialogShardError",
    "DialogSummary",
    "FieldViolation",
    "Message",
    "Order",
    "OverridePage",
    "PlacedMessage",
    "PlacedMessagePage",
    "RetryPolicy",
    "SentMessage",
    "ShardOverride",
    "ShardResolution",
    "ShardSource",
    "ShardStats",
    "TokenProvider",
    "UserErasure",
    "aio_channel",
    "new_request_id",
    "sync_channel",
]
