"""Opaque, tamper-proof page tokens (AIP-158).

A token is `base64url(version | kind | cursor | mac)`, where the MAC is an
HMAC-SHA256 (truncated to 16 bytes) over the version, the kind, the *binding*
and the cursor. The binding is everything the token must not be reused with
(the dialog's pair and the order), and is not stored in the token: a token
presented for another dialog or order fails verification like a forged one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct

_VERSION = 1
_MAC_BYTES = 16
#: Bytes of a page's response kept for its next_page_token (about 50 encoded) and framing.
_TOKEN_ROOM = 128


def items_budget(max_response_bytes: int) -> int:
    """The share of a page response's `max_response_bytes` its items may fill; the rest is the token's."""
    return max_response_bytes - _TOKEN_ROOM


class InvalidPageToken(ValueError):
    """The page token was not issued by this service for this request."""


class PageTokenCodec:
    """Signs and verifies page tokens with one secret key."""

    #: Token kinds; a token of one list cannot page another.
    DIALOG = 1
    OVERRIDES = 2
    MESSAGES = 3
    #: SubscribeMessages' resume tokens (server.delivery.resume) and ListDialogs' page tokens.
    SUBSCRIPTION = 4
    INBOX = 5

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the page token secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, kind: int, binding: bytes, cursor: bytes) -> bytes:
        message = struct.pack(">BBH", _VERSION, kind, len(binding)) + binding + cursor
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, kind: int, binding: bytes, cursor: bytes) -> str:
        body = bytes((_VERSION, kind)) + cursor
        return base64.urlsafe_b64encode(body + self._mac(kind, binding, cursor)).rstrip(b"=").decode()

    def decode(self, token: str, kind: int, binding: bytes) -> bytes:
        """The cursor inside `token`; InvalidPageToken if it is malformed, forged or bound elsewhere."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidPageToken("page_token is malformed") from None
        if len(raw) < 2 + _MAC_BYTES or raw[0] != _VERSION or raw[1] != kind:
            raise InvalidPageToken("page_token is malformed or was issued by another method")
        cursor, mac = raw[2:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(kind, binding, cursor)):
            raise InvalidPageToken(
                "page_token does not belong to this request: "
                "it was issued for another dialog or order, or altered"
            )
        return cursor
