"""dialog.v1.DialogService: SendMessage, GetDialog, DeleteMessage, SubscribeMessages and ListDialogs."""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Mapping
from typing import Any

import grpc

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc as pb_grpc
from server.archive.merge import merge_pages
from server.archive.reader import ArchiveReader
from server.auth import current_principal
from server.config import LimitsConfig
from server.delivery import DeliveryHub, ResumeTokens, Subscription
from server.errors import AlreadyExists, PermissionDenied
from server.observability.activity import ActivityRecorder
from server.pagination import InvalidPageToken, PageTokenCodec, items_budget
from server.placement import Placement
from server.routing import Pair, Resolution
from server.routing.inbox import inbox_shard
from server.services.convert import add_page, fill_message, set_timestamp
from server.services.validation import (
    Violations,
    check_pair,
    check_request_id,
    check_text,
    check_user_id,
    page_size,
)
from server.storage import deletion, tombstones
from server.storage.ids import MessageIdGenerator, id_time
from server.storage.inbox import InboxStore
from server.storage.messages import PAGE_MESSAGE_OVERHEAD, InsertResult, NewMessage, PageRow
from server.storage.pools import ShardSet

Context = grpc.aio.ServicerContext[Any, Any]

#: Messages per read when the inbox relay looks for a dialog's newest surviving message.
_NEWEST_PAGE = 8


def _require_caller(field: str, user_id: int, action: str, reason: str) -> None:
    """Authorization comes before validation (AIP-211): the caller acts only as itself."""
    principal = current_principal.get()
    if principal is None or principal.user_id != user_id:
        raise PermissionDenied(
            f"{field} must be the authenticated user: a caller may only {action}", reason=reason
        )


class DialogService(pb_grpc.DialogServiceServicer):
    def __init__(
        self,
        placement: Placement,
        shards: ShardSet,
        tokens: PageTokenCodec,
        limits: LimitsConfig,
        activity: ActivityRecorder | None = None,
        *,
        delivery: DeliveryHub,
        inboxes: Mapping[int, InboxStore],
        archive: ArchiveReader | None = None,
    ) -> None:
        self._placement = placement
        self._activity = activity or ActivityRecorder()
        self._archive = archive
        self._shards = shards
        self._tokens = tokens
        self._limits = limits
        self._page_bytes = items_budget(limits.max_response_bytes)
        self._ids = MessageIdGenerator()
        self._delivery = delivery
        self._resume_tokens = ResumeTokens(tokens)
        self._inboxes = inboxes

    def _page_size(self, violations: Violations, requested: int) -> int:
        return page_size(
            violations,
            "page_size",
            requested,
            default=self._limits.default_page_size,
            maximum=self._limits.max_page_size,
        )

    async def SendMessage(self, request: pb.SendMessageRequest, context: Context) -> pb.SendMessageResponse:
        _require_caller("from_user_id", request.from_user_id, "send as itself", "NOT_MESSAGE_SENDER")
        violations = Violations()
        check_pair(violations, ("from_user_id", "to_user_id"), (request.from_user_id, request.to_user_id))
        check_text(violations, "text", request.text, self._limits)
        check_request_id(violations, "request_id", request.request_id)
        violations.raise_if_any()

        where = self._placement.resolve(request.from_user_id, request.to_user_id)
        message_id = self._ids.next()
        message = NewMessage(
            message_id=message_id,
            pair=where.pair,
            bucket=where.bucket,
            from_user_id=request.from_user_id,
            to_user_id=request.to_user_id,
            text=request.text,
            created_at=id_time(message_id),
            request_id=request.request_id or None,
        )
        activity = self._activity

        async def insert(shard_id: int) -> InsertResult:
            result = await self._shards.store(shard_id).insert(message)
            if not result.replayed:
                activity.sent(shard_id, where.pair, where.bucket, len(request.text.encode()))
                self._delivery.written(shard_id)  # its subscribers' readers read the log now
            return result

        # A refused insert committed nothing, so the same message (same id) goes to the new shard.
        result = await self._placement.through_moves(where, insert)
        stored = result.message
        if result.replayed and (stored.to_user_id != request.to_user_id or stored.text != request.text):
            raise AlreadyExists(
                "request_id was already used for a different message; use a new request_id per message",
                reason="REQUEST_ID_REUSED",
                metadata={"message_id": str(stored.message_id)},
            )
        response = pb.SendMessageResponse(replayed=result.replayed)
        fill_message(response.message, stored)
        return response

    async def GetDialog(self, request: pb.GetDialogRequest, context: Context) -> pb.GetDialogResponse:
        _require_caller("user_id", request.user_id, "read its own dialogs", "NOT_DIALOG_MEMBER")
        violations = Violations()
        check_pair(violations, ("user_id", "peer_user_id"), (request.user_id, request.peer_user_id))
        limit = self._page_size(violations, request.page_size)
        if request.order not in pb.MessageOrder.values():
            violations.add("order", f"unknown order {request.order}")
        violations.raise_if_any()
        oldest_first = request.order == pb.MESSAGE_ORDER_OLDEST_FIRST
        where = self._placement.resolve(request.user_id, request.peer_user_id)
        binding = struct.pack(">qq?", where.pair.low, where.pair.high, oldest_first)
        after: uuid.UUID | None = None
        if request.page_token:
            try:
                cursor = self._tokens.decode(request.page_token, PageTokenCodec.DIALOG, binding)
                after = uuid.UUID(bytes=cursor)
            except (InvalidPageToken, ValueError) as exc:
                violations.add(
                    "page_token", str(exc) if isinstance(exc, InvalidPageToken) else "is malformed"
                )
                violations.raise_if_any()

        rows, more, resume_after = await self._dialog_page(where, after, oldest_first, limit)
        next_token = ""
        if more and resume_after is not None:
            next_token = self._tokens.encode(PageTokenCodec.DIALOG, binding, uuid.UUID(resume_after).bytes)
        response = pb.GetDialogResponse(next_page_token=next_token)
        add_page(response.messages, rows)
        return response

    async def _dialog_page(
        self, where: Resolution, after: uuid.UUID | None, oldest_first: bool, limit: int
    ) -> tuple[list[PageRow], bool, str | None]:
        """A page of the dialog, hot and archived; whether more follow and the id after which the
        next page starts."""
        # The page ends at `limit` messages or at the byte budget, whichever comes first; the
        # storage reads one row beyond it to tell whether another page exists, without a count.
        activity = self._activity

        async def page(shard_id: int) -> tuple[list[PageRow], bool]:
            found = await self._shards.store(shard_id).page(
                where.pair, after=after, oldest_first=oldest_first, limit=limit, max_bytes=self._page_bytes
            )
            activity.read(shard_id, where.pair, where.bucket)
            return found

        rows, more = await self._placement.through_moves(where, page)
        resume_after = rows[-1][0] if rows else None
        if self._archive is not None:
            rows, more, resume_after = await self._with_archive(
                self._archive, where.pair, after, oldest_first, limit, rows, more
            )
        return rows, more, resume_after

    async def newest_message(self, user_id: int, peer_id: int) -> PageRow | None:
        """The dialog's newest message, hot or archived, as GetDialog shows it (the inbox relay's
        read when a dialog's last message is deleted)."""
        where = self._placement.router.resolve(user_id, peer_id)
        after: uuid.UUID | None = None
        while True:
            # A page may come back empty but for deleted archived messages: read on past them.
            rows, more, resume_after = await self._dialog_page(where, after, False, _NEWEST_PAGE)
            if rows or not more or resume_after is None:
                return rows[0] if rows else None
            after = uuid.UUID(resume_after)

    async def ListDialogs(self, request: pb.ListDialogsRequest, context: Context) -> pb.ListDialogsResponse:
        _require_caller("user_id", request.user_id, "list its own dialogs", "NOT_INBOX_OWNER")
        violations = Violations()
        check_user_id(violations, "user_id", request.user_id)
        limit = self._page_size(violations, request.page_size)
        violations.raise_if_any()
        binding = struct.pack(">q", request.user_id)
        before: uuid.UUID | None = None
        if request.page_token:
            try:
                before = uuid.UUID(
                    bytes=self._tokens.decode(request.page_token, PageTokenCodec.INBOX, binding)
                )
            except (InvalidPageToken, ValueError) as exc:
                violations.add(
                    "page_token", str(exc) if isinstance(exc, InvalidPageToken) else "is malformed"
                )
                violations.raise_if_any()
        inbox = self._inboxes[inbox_shard(request.user_id, len(self._inboxes))]
        rows = await inbox.page(request.user_id, before=before, limit=limit + 1)
        response = pb.ListDialogsResponse()
        # The page also ends at the byte budget of a GetDialog page (always one dialog at least).
        budget = self._page_bytes
        for index, row in enumerate(rows[:limit]):
            budget -= len(row.last_text.encode()) + PAGE_MESSAGE_OVERHEAD + 16
            if budget < 0 and index > 0:
                break
            dialog = response.dialogs.add(peer_user_id=row.peer_id, message_count=row.message_count)
            last = dialog.last_message
            last.message_id, last.text = str(row.last_message_id), row.last_text
            last.from_user_id = row.last_from_user_id
            last.to_user_id = request.user_id if row.last_from_user_id == row.peer_id else row.peer_id
            set_timestamp(last.create_time, row.last_created_at)
        if len(response.dialogs) < len(rows):
            last_id = uuid.UUID(response.dialogs[-1].last_message.message_id)
            response.next_page_token = self._tokens.encode(PageTokenCodec.INBOX, binding, last_id.bytes)
        return response

    async def SubscribeMessages(  # type: ignore[override]  # writes its responses (see _write_unless)
        self, request: pb.SubscribeMessagesRequest, context: Context
    ) -> None:
        _require_caller("user_id", request.user_id, "subscribe to its own messages", "NOT_SUBSCRIBER")
        violations = Violations()
        check_user_id(violations, "user_id", request.user_id)
        violations.raise_if_any()
        resume = None
        if request.resume_token:
            try:
                resume = self._resume_tokens.decode(request.user_id, request.resume_token)
            except InvalidPageToken as exc:
                violations.add("resume_token", str(exc).replace("page_token", "resume_token"))
                violations.raise_if_any()
        subscription = await self._delivery.subscribe(request.user_id, resume)
        try:
            # The first response says the subscription is live, with a token from which to resume
            # even before a message came.
            await _write_unless(
                context,
                pb.SubscribeMessagesResponse(
                    resume_token=self._resume_tokens.encode(request.user_id, subscription.positions)
                ),
                subscription,
            )
            while True:
                _, event = await subscription.next()
                response = pb.SubscribeMessagesResponse(
                    resume_token=self._resume_tokens.encode(request.user_id, subscription.positions)
                )
                fill_message(response.message, event)
                await _write_unless(context, response, subscription)
        finally:
            self._delivery.unsubscribe(subscription)

    async def _with_archive(
        self,
        archive: ArchiveReader,
        pair: Pair,
        after: uuid.UUID | None,
        oldest_first: bool,
        limit: int,
        hot: list[PageRow],
        hot_more: bool,
    ) -> tuple[list[PageRow], bool, str | None]:
        """The page with the archived messages that belong on it, whether more follow and the id
        the next page continues after: the same cursor walks the shard's messages and the
        archive's, in both orders. No file is read when none can belong there."""
        unchanged = hot, hot_more, hot[-1][0] if hot else None
        newest = await archive.newest_id(pair)
        cursor = None if after is None else str(after)
        if newest is None:
            return unchanged
        if oldest_first and cursor is not None and cursor >= newest:
            return unchanged
        if not oldest_first and hot_more and hot[-1][0] > newest:
            return unchanged
        cold, cold_more = await archive.page(pair, after=cursor, oldest_first=oldest_first, limit=limit)
        deleted: set[str] = set()
        if cold:
            ids = [row[0] for row in cold]
            deleted = await self._placement.control.guard(self._tombstoned(ids))
        return merge_pages(
            hot,
            hot_more,
            cold,
            cold_more,
            oldest_first=oldest_first,
            limit=limit,
            max_bytes=self._page_bytes,
            overhead=PAGE_MESSAGE_OVERHEAD,
            deleted=deleted,
        )

    async def _tombstoned(self, ids: list[str]) -> set[str]:
        async with self._placement.control_pool.connection() as conn:
            return await tombstones.deleted_among(conn, ids)

    async def _move_targets(self, pair: Pair) -> list[int]:
        async with self._placement.control_pool.connection() as conn:
            return await deletion.move_targets(conn, pair)

    async def _tombstone(self, message_id: uuid.UUID, pair: Pair, sender: int) -> bool:
        async with self._placement.control_pool.connection() as conn:
            return await tombstones.record(conn, message_id, pair, sender)

    async def DeleteMessage(
        self, request: pb.DeleteMessageRequest, context: Context
    ) -> pb.DeleteMessageResponse:
        _require_caller("user_id", request.user_id, "delete messages it sent", "NOT_MESSAGE_SENDER")
        violations = Violations()
        check_pair(violations, ("user_id", "peer_user_id"), (request.user_id, request.peer_user_id))
        try:
            message_id = uuid.UUID(request.message_id)
        except ValueError:
            violations.add(
                "message_id", "must be a message id as SendMessage and GetDialog return it (a UUID)"
            )
        violations.raise_if_any()
        where = self._placement.resolve(request.user_id, request.peer_user_id)
        pair = where.pair
        sender = await self._placement.through_moves(
            where, lambda shard_id: deletion.sender_of(self._shards.store(shard_id), pair, message_id)
        )
        archived = None
        if sender is None and self._archive is not None:
            archived = await self._archive.find(pair, str(message_id))
            sender = None if archived is None else archived[1]
        targets: list[int] | None = None
        if sender is None:
            # Only a copy a move made before an earlier delete may be left, on the move's target.
            targets = await self._placement.control.guard(self._move_targets(pair))
            for target in targets:
                sender = await deletion.sender_of(self._shards.store(target), pair, message_id)
                if sender is not None:
                    break
        if sender is None:
            # Already deleted (or never in this dialog): deleting is idempotent.
            return pb.DeleteMessageResponse(deleted=False)
        if sender != request.user_id:
            raise PermissionDenied(
                "only the sender of a message may delete it; this message was sent by peer_user_id",
                reason="NOT_MESSAGE_SENDER",
            )
        tombstoned = False
        if self._archive is not None:
            # First: it hides any archived copy, even one an archive run is writing right now.
            tombstoned = await self._placement.control.guard(self._tombstone(message_id, pair, sender))
        logged_on: list[int] = []

        async def delete_sent(shard_id: int) -> bool:
            # The delete logs its deletion (server.storage.events) for the inbox relay.
            deleted = await deletion.delete_sent(self._shards.store(shard_id), pair, message_id, sender)
            if deleted:
                logged_on.append(shard_id)
            return deleted

        removed = await self._placement.through_moves(where, delete_sent)
        if targets is None:
            targets = await self._placement.control.guard(self._move_targets(pair))
        for target in targets:
            # A move may have copied the message already: its verification must not find the copy.
            if await deletion.delete_copy(self._shards.store(target), pair, message_id):
                removed = True
                logged_on.append(target)
        if archived is not None and not logged_on:
            # Only the archive held it: log the deletion on the dialog's shard. A retry finds the
            # archived message again and logs it again; the relay counts a deletion once.
            peer = request.peer_user_id

            async def log_deletion(shard_id: int) -> None:
                store = self._shards.store(shard_id)
                await deletion.log_archived_deletion(store, pair, message_id, sender, peer)
                logged_on.append(shard_id)

            await self._placement.through_moves(where, log_deletion)
        for shard_id in logged_on:
            self._delivery.written(shard_id)  # the relay reads the deletion now
        return pb.DeleteMessageResponse(deleted=removed or (archived is not None and tombstoned))


async def _write_unless(
    context: Context, response: pb.SubscribeMessagesResponse, subscription: Subscription
) -> None:
    """Write `response`, unless the subscription fails first (a client that does not read holds
    the write: the failure is raised instead)."""
    write = asyncio.ensure_future(context.write(response))
    await asyncio.wait((write, subscription.failed()), return_when=asyncio.FIRST_COMPLETED)
    if not write.done():
        write.cancel()
        assert subscription.failure is not None
        raise subscription.failure
    write.result()
