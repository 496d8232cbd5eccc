"""Typed clients of dialog.v1.DialogService: `DialogClient` (blocking) and `AsyncDialogClient`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, TypeAlias

from client._calls import AsyncCaller, Metadata, SyncCaller, follow_pages, follow_pages_async
from client._errors import build_request
from client._models import DialogPage, Message, Order, SentMessage
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
