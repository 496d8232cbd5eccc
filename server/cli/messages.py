"""`dialogctl messages`: stored messages with their shard and placement reason (the seed's debug_messages).

    dialogctl messages                      # first page over all shards
    dialogctl messages --pair 1 2 --all     # every message of one dialog, wherever it is stored
    dialogctl messages --shard 3 --json     # one shard, as JSON

Calls AdminService.ListMessages through client.AdminClient; `--all` follows next_page_token to the end.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from client import PlacedMessage
from client.gen.dialog.v1 import admin_service_pb2 as admin_pb
from server.cli.output import format_table, message_dict, print_json, rfc3339, source_name
from server.cli.progress import Progress
from server.cli.session import Session, int64_arg, page_size_arg, shard_id_arg

_TEXT_WIDTH = 40
_HEADERS = ("SHARD", "MESSAGE_ID", "FROM", "TO", "CREATED", "PLACEMENT", "TEXT")


def _placement(m: PlacedMessage) -> str:
    reason = source_name(m.source)
    if m.resolved_shard_id != m.shard_id:
        return f"{reason} -> {m.resolved_shard_id} (not moved yet)"
    return reason


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _TEXT_WIDTH else flat[: _TEXT_WIDTH - 1] + "…"


def cmd_messages(session: Session) -> int:
    args = session.args
    admin = session.admin()
    pair = (args.pair[0], args.pair[1]) if args.pair is not None else None
    messages: list[PlacedMessage]
    if args.all:
        messages = []
        with Progress("messages") as progress:
            for message in admin.iter_messages(
                pair=pair, shard_id=args.shard, page_size=args.page_size, page_token=args.page_token
            ):
                messages.append(message)
                progress.update(f"{len(messages)} fetched")
        token = ""
    else:
        page = admin.list_messages(
            pair=pair, shard_id=args.shard, page_size=args.page_size, page_token=args.page_token
        )
        messages, token = list(page.messages), page.next_page_token
    if session.json:
        response = admin_pb.ListMessagesResponse(
            messages=[m.to_proto() for m in messages], next_page_token=token
        )
        print_json(message_dict(response))
        return 0
    rows = [
        [
            m.shard_id,
            m.message.message_id,
            m.message.from_user_id,
            m.message.to_user_id,
            rfc3339(m.message.create_time),
            _placement(m),
            _short(m.message.text),
        ]
        for m in messages
    ]
    if rows:
        print(format_table(_HEADERS, rows, right=(0, 2, 3)))
    print(f"{len(messages)} message{'' if len(messages) == 1 else 's'}")
    if token:
        print(f"more: dialogctl messages ... --page-token {token}   (or --all)")
    return 0


def register(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `messages` to dialogctl's subcommands."""
    parser = command(
        commands, "messages", cmd_messages, "list stored messages with their shard and placement reason"
    )
    parser.add_argument(
        "--pair", nargs=2, type=int64_arg, metavar=("A", "B"), help="only the dialog of users A and B"
    )
    parser.add_argument("--shard", type=shard_id_arg, metavar="SHARD", help="only messages stored on SHARD")
    parser.add_argument(
        "--page-size", type=page_size_arg, default=0, metavar="N", help="messages per page (default 100)"
    )
    parser.add_argument("--page-token", default="", metavar="TOKEN", help="continue after an earlier page")
    parser.add_argument("--all", action="store_true", help="follow next_page_token to the last page")
