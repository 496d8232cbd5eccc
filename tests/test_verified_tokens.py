"""TokenVerifier remembers verified tokens, but never past their expiry and never for another key."""

from __future__ import annotations

import time
from dataclasses import replace

import jwt
import pytest

from server.auth import TokenVerifier
from server.config import AuthConfig
from server.errors import Unauthenticated
from tests.support import wait_until_blocking

SECRET = b"k" * 48


def _token(secret: bytes, exp: float) -> str:
    return jwt.encode({"sub": "7", "iat": int(time.time()), "exp": exp}, secret, algorithm="HS256")


def test_a_remembered_token_still_expires() -> None:
    verifier = TokenVerifier(AuthConfig(jwt_secret=SECRET, leeway_seconds=0))
    exp = int(time.time()) + 1
    token = _token(SECRET, exp)
    assert verifier.verify(token).user_id == 7
    assert verifier.verify(token).user_id == 7  # remembered
    wait_until_blocking(lambda: time.time() >= exp, "the token's exp passes", within=5, every=0.05)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(token)


def test_a_token_remembered_under_one_key_is_checked_again_under_another() -> None:
    config = AuthConfig(jwt_secret=SECRET)
    verifier = TokenVerifier(config)
    token = _token(SECRET, time.time() + 600)
    assert verifier.verify(token).user_id == 7
    # The same verifier state with the secret rotated: the remembered entry belongs to the old key.
    verifier._config = replace(config, jwt_secret=b"n" * 48)
    with pytest.raises(Unauthenticated):
        verifier.verify(token)
