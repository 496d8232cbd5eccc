"""Strict tokens against a real server: canonical `sub`, bounded lifetimes, revocation by jti and kid.

The module's server accepts HS256 (its own secret) and ES256 (a JWKS), pins iss and aud, keeps
the default lifetimes (a day for users, an hour for admins) and watches a revocation file that
the tests rewrite atomically, as an operator's tooling would.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec

from client.gen.dialog.v1 import admin_service_pb2 as apb
from client.gen.dialog.v1 import admin_service_pb2_grpc, dialog_service_pb2_grpc
from client.gen.dialog.v1 import dialog_service_pb2 as pb
from server.config import DEFAULT_MAX_ADMIN_TOKEN_LIFETIME, DEFAULT_MAX_TOKEN_LIFETIME
from server.dev.embedded_pg import EmbeddedPostgres
from tests.support import Metadata, expect_error, make_config, serving, status_details

ISSUER = "https://issuer.strict.test"
AUDIENCE = "dialog-shard-strict"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_KEY_2 = ec.generate_private_key(ec.SECP256R1())


def write_atomically(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def jwks(*entries: tuple[ec.EllipticCurvePrivateKey, str]) -> dict[str, Any]:
    keys = [
        {**jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid}
        for key, kid in entries
    ]
    return {"keys": keys}


class Stubs:
    """The module server's stubs and the secret and files its tokens and keys come from."""

    def __init__(self, channel: grpc.aio.Channel, secret: str, revocations: Path, keys: Path) -> None:
        self.dialog = dialog_service_pb2_grpc.DialogServiceStub(channel)
        self.admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        self.secret = secret
        self.revocations = revocations
        self.keys = keys

    def hs256(self, payload: dict[str, Any], kid: str | None = None) -> str:
        return jwt.encode(payload, self.secret, algorithm="HS256", headers={"kid": kid} if kid else None)

    async def read(self, user: int, peer: int, token: str) -> Any:
        """GetDialog as `user` (read-only: hostile tokens must not even get this far)."""
        request = pb.GetDialogRequest(user_id=user, peer_user_id=peer, page_size=1)
        return await self.dialog.GetDialog(request, metadata=bearer(token))

    async def admin_call(self, token: str) -> Any:
        return await self.admin.ResolveShard(
            apb.ResolveShardRequest(user_id_1=1, user_id_2=2), metadata=bearer(token)
        )


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def claims(sub: object = None, *, lifetime: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {"iat": now, "exp": now + lifetime, "iss": ISSUER, "aud": AUDIENCE, **extra}
    if sub is not None:
        payload["sub"] = sub
    return payload


@pytest_asyncio.fixture(scope="module")
async def stubs(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stubs]:
    files = tmp_path_factory.mktemp("strict")
    revocations, keys = files / "revoked.json", files / "jwks.json"
    write_atomically(revocations, {})
    write_atomically(keys, jwks((EC_KEY, "ec-1"), (EC_KEY_2, "ec-2")))
    config = make_config(
        [s.dsn for s in pg_servers],
        jwt_secret,
        auth={
            "algorithms": ["HS256", "ES256"],
            "jwt_secret": jwt_secret,
            "jwks_file": str(keys),
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "revocation_file": str(revocations),
        },
    )
    assert config.auth.max_token_lifetime_seconds == DEFAULT_MAX_TOKEN_LIFETIME == 24 * 3600
    assert config.auth.max_admin_token_lifetime_seconds == DEFAULT_MAX_ADMIN_TOKEN_LIFETIME == 3600
    async with serving(config) as (_, channel):
        yield Stubs(channel, jwt_secret, revocations, keys)


async def refused(call: Any, fragment: str, reason: str = "TOKEN_INVALID") -> None:
    err = await expect_error(call, grpc.StatusCode.UNAUTHENTICATED)
    assert fragment in (err.details() or ""), err.details()
    info, _ = status_details(err)
    assert info is not None and info.reason == reason, info


@pytest.mark.parametrize(
    "sub",
    [
        "007",  # would act as user 7
        "+7",
        "1_0",
        "\u0667",  # ARABIC-INDIC DIGIT SEVEN
        "\uff17",  # FULLWIDTH DIGIT SEVEN
        "\U0001d7d5",  # MATHEMATICAL BOLD DIGIT SEVEN
        " 7",
        "7 ",
        "7\n",
        "0",
        "-7",
        "7.0",
        "1e3",
        "0x7",
        "",
        "9223372036854775808",  # 2^63: past int64
        "18446744073709551623",  # 2^64 + 7: would wrap to 7 in a careless cast
    ],
)
async def test_sub_must_be_a_canonical_decimal_string(stubs: Stubs, sub: str) -> None:
    await refused(stubs.read(7, 8, stubs.hs256(claims(sub))), "canonical decimal form")


@pytest.mark.parametrize(
    ("sub", "kind"), [(7, "number"), (7.0, "number"), (True, "boolean"), (["7"], "array")]
)
async def test_a_sub_that_is_not_a_string_is_refused_with_a_clear_message(
    stubs: Stubs, sub: object, kind: str
) -> None:
    await refused(
        stubs.read(7, 8, stubs.hs256(claims(sub))),
        f'must be a string holding the user id ("42"), not a JSON {kind}',
    )


async def test_canonical_subs_are_accepted_up_to_the_largest_int64(stubs: Stubs) -> None:
    for user in (7, 2**63 - 1):
        reply = await stubs.read(user, 8, stubs.hs256(claims(str(user))))
        assert list(reply.messages) == []
    # The admin claim alone (no sub) is an admin tool's token; with a bad sub it is refused too.
    await stubs.admin_call(stubs.hs256(claims(admin=True)))
    await refused(stubs.admin_call(stubs.hs256(claims("007", admin=True))), "canonical decimal form")


async def test_token_lifetime_is_bounded_and_shorter_for_admins(stubs: Stubs) -> None:
    day, hour = DEFAULT_MAX_TOKEN_LIFETIME, DEFAULT_MAX_ADMIN_TOKEN_LIFETIME
    await stubs.read(7, 8, stubs.hs256(claims("7", lifetime=day)))
    await refused(stubs.read(7, 8, stubs.hs256(claims("7", lifetime=day + 1))), "longer than the 86400 s")
    await stubs.admin_call(stubs.hs256(claims(admin=True, lifetime=hour)))
    await refused(
        stubs.admin_call(stubs.hs256(claims(admin=True, lifetime=hour + 1))),
        "longer than the 3600 s this server accepts for admin tokens",
    )
    # A user's day-long token with the admin claim is an admin token: the admin limit applies.
    await refused(
        stubs.admin_call(stubs.hs256(claims("7", admin=True, lifetime=day))), "accepts for admin tokens"
    )
    # Without iat the lifetime is unknown: refused, for HS256 and for the issuer's ES256 alike.
    no_iat = {k: v for k, v in claims("7").items() if k != "iat"}
    await refused(stubs.read(7, 8, stubs.hs256(no_iat)), "lacks the required claim 'iat'")
    es256 = jwt.encode(no_iat, EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    await refused(stubs.read(7, 8, es256), "lacks the required claim 'iat'")
    # An iat in the future does not stretch the window.
    future = claims("7", iat=int(time.time()) + 3600)
    await refused(stubs.read(7, 8, stubs.hs256(future)), "not valid yet")


async def test_revoked_jti_applies_at_once_also_to_remembered_tokens(
    stubs: Stubs, new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    revoked = stubs.hs256(claims(str(a), jti="session-1"))
    kept = stubs.hs256(claims(str(a), jti="session-2"))
    await stubs.read(a, b, revoked)  # verified and remembered
    await stubs.read(a, b, kept)
    try:
        await asyncio.to_thread(write_atomically, stubs.revocations, {"jti": ["session-1"]})
        await refused(stubs.read(a, b, revoked), "has been revoked", "TOKEN_REVOKED")
        await stubs.read(a, b, kept)
        # A broken update keeps the revocations in force (and logs a warning).
        await asyncio.to_thread(stubs.revocations.write_text, "{not json")
        await refused(stubs.read(a, b, revoked), "has been revoked", "TOKEN_REVOKED")
        # So does a deleted file.
        await asyncio.to_thread(stubs.revocations.unlink)
        await refused(stubs.read(a, b, revoked), "has been revoked", "TOKEN_REVOKED")
    finally:
        await asyncio.to_thread(write_atomically, stubs.revocations, {})
    await stubs.read(a, b, revoked)  # lifted again: the list is the only source of truth


async def test_revoked_kid_refuses_every_token_of_that_key(
    stubs: Stubs, new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    leaked = jwt.encode(claims(str(a)), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    fresh = jwt.encode(claims(str(a), jti="new"), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    other = jwt.encode(claims(str(a)), EC_KEY_2, algorithm="ES256", headers={"kid": "ec-2"})
    hs_kid = stubs.hs256(claims(str(a)), kid="hs-2024")
    for token in (leaked, other, hs_kid):
        await stubs.read(a, b, token)
    try:
        await asyncio.to_thread(write_atomically, stubs.revocations, {"kid": ["ec-1", "hs-2024"]})
        for token in (leaked, fresh, hs_kid):
            await refused(stubs.read(a, b, token), "signing key has been revoked", "TOKEN_REVOKED")
        await stubs.read(a, b, other)
    finally:
        await asyncio.to_thread(write_atomically, stubs.revocations, {})
    await stubs.read(a, b, leaked)
