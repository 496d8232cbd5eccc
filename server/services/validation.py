"""Request validation: every field checked before any database work.

Each check appends a FieldViolation; `raise_if_any` turns the list into one
INVALID_ARGUMENT carrying all of them (AIP-193 BadRequest), so a caller fixes
every problem in one round.
"""

from __future__ import annotations

from server.config import LimitsConfig
from server.errors import FieldViolation, InvalidArgument

MAX_USER_ID = 2**63 - 1
MAX_REQUEST_ID_CHARS = 128


class Violations(list[FieldViolation]):
    """Collected field violations of one request."""

    def add(self, field: str, description: str) -> None:
        self.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self:
            raise InvalidArgument(self)


def check_user_id(violations: Violations, field: str, value: int) -> None:
    if not 1 <= value <= MAX_USER_ID:
        violations.add(field, f"must be a user id in 1..{MAX_USER_ID}, got {value}")


def check_shard_id(violations: Violations, field: str, value: int, shard_count: int) -> None:
    if not 0 <= value < shard_count:
        violations.add(field, f"must be a shard id in 0..{shard_count - 1}, got {value}")


def check_pair(violations: Violations, fields: tuple[str, str], values: tuple[int, int]) -> None:
    check_user_id(violations, fields[0], values[0])
    check_user_id(violations, fields[1], values[1])
    if values[0] == values[1] and values[0] > 0:
        violations.add(fields[1], f"must differ from {fields[0]}: a dialog is between two different users")


def check_text(violations: Violations, field: str, text: str, limits: LimitsConfig) -> None:
    if not text.strip():
        violations.add(field, "must contain at least one non-whitespace character")
        return
    if "\x00" in text:
        violations.add(field, "must not contain NUL (U+0000) characters")
    if len(text) > limits.max_text_chars:
        violations.add(field, f"is {len(text)} characters long; the limit is {limits.max_text_chars}")
    else:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limits.max_text_bytes:
            violations.add(field, f"is {size} bytes in UTF-8; the limit is {limits.max_text_bytes}")


def check_request_id(violations: Violations, field: str, value: str) -> None:
    if len(value) > MAX_REQUEST_ID_CHARS or not all("!" <= c <= "~" for c in value):
        violations.add(
            field, f"must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces"
        )


def page_size(violations: Violations, field: str, value: int, *, default: int, maximum: int) -> int:
    """AIP-158: 0 means the default, larger than the maximum means the maximum, negative is invalid."""
    if value < 0:
        violations.add(field, f"must not be negative, got {value}")
        return default
    if value == 0:
        return default
    return min(value, maximum)
