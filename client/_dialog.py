"""Typed clients of dialog.v1.DialogService: `DialogClient` (blocking) and `AsyncDialogClient`."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, TypeAlias

import grpc

from client._calls import AsyncCaller, Metadata, SyncCaller, follow_pages, follow_pages_async
from client._errors import build_request, error_from_rpc
from client._models import (
    DeliveredMessage,
    DialogList,
    DialogPage,
    DialogSummary,
    Message,
    Order,
    SentMessage,
)
from client._retry import RetryPolicy
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    _AsyncStub: TypeAlias = pb_grpc.DialogServiceAsyncStub
else:
    _AsyncStub = pb_grpc.DialogServiceStub


def new_request_id() -> str:
    """A fresh idempotency key (32 hex digits): one per logical message, reused by its retries."""
    return uuid.uuid4().hex


def _send_request(from_user_id: int, to_user_id: int, text: str, request_id: str) -> pb.SendMessageRequest:
    return build_request(
        pb.SendMessageRequest,
        from_user_id=from_user_id,
        to_user_id=to_user_id,
        text=text,
        request_id=request_id,
    )


def _dialog_request(
    user_id: int, peer_user_id: int, page_size: int, page_token: str, order: Order
) -> pb.GetDialogRequest:
    return build_request(
        pb.GetDialogRequest,
        user_id=user_id,
        peer_user_id=peer_user_id,
        page_size=page_size,
        page_token=page_token,
        order=order.value,
    )


def _list_request(user_id: int, page_size: int, page_token: str) -> pb.ListDialogsRequest:
    return build_request(pb.ListDialogsRequest, user_id=user_id, page_size=page_size, page_token=page_token)


def _dialog_list(response: pb.ListDialogsResponse) -> DialogList:
    return DialogList(tuple(DialogSummary.from_proto(d) for d in response.dialogs), response.next_page_token)


class _Resumption:
    """Where a subscription resumes, and how long to wait before reconnecting after a failure.

    A stream that ends with UNAVAILABLE (a server going away), RESOURCE_EXHAUSTED (a slow consumer
    cut off, too many streams) or DEADLINE_EXCEEDED is resumed from the last token received, after
    a backoff; `retry.max_attempts` failures in a row without a response in between give up. Other
    errors (OUT_OF_RANGE for a token past the server's retention: re-sync with get_dialog) are
    raised.
    """

    _RESUMABLE = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
    )

    def __init__(self, user_id: int, resume_token: str, retry: RetryPolicy, rng: random.Random) -> None:
        self.user_id = user_id
        self.token = resume_token
        self._retry = retry
        self._rng = rng
        self._failures = 0

    def request(self) -> pb.SubscribeMessagesRequest:
        return build_request(pb.SubscribeMessagesRequest, user_id=self.user_id, resume_token=self.token)

    def received(self, response: pb.SubscribeMessagesResponse) -> DeliveredMessage | None:
        """Note a response; the message it delivers, if any (the first response has none)."""
        self._failures = 0
        self.token = response.resume_token
        if not response.HasField("message"):
            return None
        return DeliveredMessage(Message.from_proto(response.message), response.resume_token)

    def delay_after(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before resuming after the stream failed with `exc`; raises if it cannot."""
        error = error_from_rpc(exc, attempts=self._failures + 1)
        self._failures += 1
        if error.code not in self._RESUMABLE or self._failures >= self._retry.max_attempts:
            raise error
        return max(error.retry_delay or 0.0, self._retry.backoff(self._failures, self._rng))


def _delete_request(user_id: int, peer_user_id: int, message_id: str) -> pb.DeleteMessageRequest:
    return build_request(
        pb.DeleteMessageRequest, user_id=user_id, peer_user_id=peer_user_id, message_id=message_id
    )


def _sent(response: pb.SendMessageResponse, request_id: str) -> SentMessage:
    return SentMessage(Message.from_proto(response.message), response.replayed, request_id)


def _page(response: pb.GetDialogResponse) -> DialogPage:
    return DialogPage(tuple(Message.from_proto(m) for m in response.messages), response.next_page_token)


class DialogClient(SyncCaller[pb_grpc.DialogServiceStub]):
    """Blocking DialogService client; every method takes keyword-only `timeout` and `metadata`.

    `timeout` (seconds) bounds the whole call, retries included; None uses the client's default.
    Failures raise `DialogShardError`. Build one with `DialogClient.connect(...)`, or wrap a
    channel you manage (`DialogClient(channel)`; closing the client then leaves it open).
    """

    stub_class = pb_grpc.DialogServiceStub

    def send_message(
        self,
        from_user_id: int,
        to_user_id: int,
        text: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> SentMessage:
        """Store a message; retried safely: every attempt carries the same request_id."""
        request_id = request_id or new_request_id()
        response = self._call(
            self._stub.SendMessage,
            _send_request(from_user_id, to_user_id, text, request_id),
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=True,
        )
        return _sent(response, request_id)

    def get_dialog(
        self,
        user_id: int,
        peer_user_id: int,
        *,
        page_size: int = 0,
        page_token: str = "",
        order: Order = Order.NEWEST_FIRST,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> DialogPage:
        """One page of the dialog of `user_id` with `peer_user_id` (page_size 0: the server's default)."""
        response = self._call(
            self._stub.GetDialog,
            _dialog_request(user_id, peer_user_id, page_size, page_token, order),
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=True,
        )
        return _page(response)

    def delete_message(
        self,
        user_id: int,
        peer_user_id: int,
        message_id: str,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> bool:
        """Delete a message `user_id` sent; True when this call deleted it, False when it was gone
        already (retried safely: deleting is idempotent)."""
        request = _delete_request(user_id, peer_user_id, message_id)
        response = self._call(
            self._stub.DeleteMessage, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return response.deleted

    def iter_dialog(
        self,
        user_id: int,
        peer_user_id: int,
        *,
        page_size: int = 0,
        order: Order = Order.NEWEST_FIRST,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> Iterator[Message]:
        """Every message of the dialog, following next_page_token; `timeout` applies per page."""

        def fetch(token: str) -> tuple[Sequence[Message], str]:
            page = self.get_dialog(
                user_id,
                peer_user_id,
                page_size=page_size,
                page_token=token,
                order=order,
                timeout=timeout,
                metadata=metadata,
            )
            return page.messages, page.next_page_token

        return follow_pages(fetch)

    def list_dialogs(
        self,
        user_id: int,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> DialogList:
        """One page of `user_id`'s dialogs, most recent activity first (page_size 0: the default)."""
        response = self._call(
            self._stub.ListDialogs,
            _list_request(user_id, page_size, page_token),
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=True,
        )
        return _dialog_list(response)

    def iter_dialogs(
        self, user_id: int, *, page_size: int = 0, timeout: float | None = None, metadata: Metadata = ()
    ) -> Iterator[DialogSummary]:
        """Every dialog of `user_id`, following next_page_token; `timeout` applies per page."""

        def fetch(token: str) -> tuple[Sequence[DialogSummary], str]:
            page = self.list_dialogs(
                user_id, page_size=page_size, page_token=token, timeout=timeout, metadata=metadata
            )
            return page.dialogs, page.next_page_token

        return follow_pages(fetch)

    def subscribe_messages(
        self, user_id: int, *, resume_token: str = "", metadata: Metadata = ()
    ) -> Generator[DeliveredMessage]:
        """The messages sent to or by `user_id` from now (or after `resume_token`) on, as they are
        stored; endless, reconnecting and resuming from the last token by itself. Closing the
        iterator (or leaving the `for`) ends the stream."""
        resumption = _Resumption(user_id, resume_token, self._retry, self._rng)
        while True:
            self._attempts(None, safe_to_repeat=True)  # refuses a closed client
            call = self._stub.SubscribeMessages(resumption.request(), metadata=tuple(metadata))
            try:
                for response in call:
                    delivered = resumption.received(response)
                    if delivered is not None:
                        yield delivered
                return  # the server ended the stream without an error (it does not)
            except grpc.RpcError as exc:
                delay = resumption.delay_after(exc)
            finally:
                call.cancel()
            time.sleep(delay)


class AsyncDialogClient(AsyncCaller[_AsyncStub]):
    """The asyncio twin of `DialogClient`: same methods, awaited; `async with` closes it."""

    stub_class = pb_grpc.DialogServiceStub

    async def send_message(
        self,
        from_user_id: int,
        to_user_id: int,
        text: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> SentMessage:
        """Store a message; retried safely: every attempt carries the same request_id."""
        request_id = request_id or new_request_id()
        response = await self._call(
            self._stub.SendMessage,
            _send_request(from_user_id, to_user_id, text, request_id),
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=True,
        )
        return _sent(response, request_id)

    async def get_dialog(
        self,
        user_id: int,
        peer_user_id: int,
        *,
        page_size: int = 0,
        page_token: str = "",
        order: Order = Order.NEWEST_FIRST,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> DialogPage:
        """One page of the dialog of `user_id` with `peer_user_id` (page_size 0: the server's default)."""
        response = await self._call(
            self._stub.GetDialog,
            _dialog_request(user_id, peer_user_id, page_size, page_token, order),
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=True,
        )
        return _page(response)

    async def delete_message(
        self,
        user_id: int,
        peer_user_id: int,
        message_id: str,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> bool:
        """Delete a message `user_id` sent; True when this call deleted it, False when it was gone
        already (retried safely: deleting is idempotent)."""
        request = _delete_request(user_id, peer_user_id, message_id)
        response = await self._call(
            self._stub.DeleteMessage, request, timeout=timeout, metadata=metadata, safe_to_repeat=True
        )
        return response.deleted

    def iter_dialog(
        self,
        user_id: int,
        peer_user_id: int,
        *,
        page_size: int = 0,
        order: Order = Order.NEWEST_FIRST,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> AsyncIterator[Message]:
        """Every message of the dialog, following next_page_token; `timeout` applies per page."""

        async def fetch(token: str) -> tuple[Sequence[Message], str]:
            page = await self.get_dialog(
                user_id,
                peer_user_id,
                page_size=page_size,
                page_token=token,
                order=order,
                timeout=timeout,
                metadata=metadata,
            )
            return page.messages, page.next_page_token

        return follow_pages_async(fetch)

    async def list_dialogs(
        self,
        user_id: int,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> DialogList:
        """One page of `user_id`'s dialogs, most recent activity first (page_size 0: the default)."""
        response = await self._call(
            self._stub.ListDialogs,
            _list_request(user_id, page_size, page_token),
            timeout=timeout,
            metadata=metadata,
            safe_to_repeat=True,
        )
        return _dialog_list(response)

    def iter_dialogs(
        self, user_id: int, *, page_size: int = 0, timeout: float | None = None, metadata: Metadata = ()
    ) -> AsyncIterator[DialogSummary]:
        """Every dialog of `user_id`, following next_page_token; `timeout` applies per page."""

        async def fetch(token: str) -> tuple[Sequence[DialogSummary], str]:
            page = await self.list_dialogs(
                user_id, page_size=page_size, page_token=token, timeout=timeout, metadata=metadata
            )
            return page.dialogs, page.next_page_token

        return follow_pages_async(fetch)

    async def subscribe_messages(
        self, user_id: int, *, resume_token: str = "", metadata: Metadata = ()
    ) -> AsyncGenerator[DeliveredMessage]:
        """The messages sent to or by `user_id` from now (or after `resume_token`) on, as they are
        stored; endless, reconnecting and resuming from the last token by itself. Closing the
        iterator (or leaving the `async for`) ends the stream."""
        resumption = _Resumption(user_id, resume_token, self._retry, self._rng)
        while True:
            self._attempts(None, safe_to_repeat=True)  # refuses a closed client
            call = self._stub.SubscribeMessages(resumption.request(), metadata=tuple(metadata))
            try:
                async for response in call:
                    delivered = resumption.received(response)
                    if delivered is not None:
                        yield delivered
                return  # the server ended the stream without an error (it does not)
            except grpc.RpcError as exc:
                delay = resumption.delay_after(exc)
            finally:
                call.cancel()
            await asyncio.sleep(delay)
