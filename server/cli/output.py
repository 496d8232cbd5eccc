"""How dialogctl prints: tables and fields for people, one JSON document for `--json`, errors on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from client import ShardSource

PROG = "dialogctl"


def message_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping with the proto field names (64-bit integers as strings, like grpcurl)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(document: object) -> None:
    print(json.dumps(document, indent=2))


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[int] = ()
) -> str:
    """Columns padded to their widest cell; the columns in `right` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_fields(fields: Sequence[tuple[str, object]]) -> str:
    """`name  value` lines, the values aligned."""
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


def fail(message: str, code: int) -> int:
    """Print `dialogctl: <message>` on stderr and return the exit status `code`."""
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def source_name(source: ShardSource) -> str:
    """`hash` or `override`: why a pair lives on its shard."""
    return source.name.lower()


def rfc3339(moment: datetime) -> str:
    """`2026-01-02T03:04:05.678Z`: a time as the proto3 JSON mapping writes it."""
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp.ToJsonString()
