"""RS256/ES256 tokens verified with public keys (PEM, or JWKS rotated by kid), and attacks on them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.auth import TokenVerifier, issue_token
from server.config import AuthConfig, ConfigError, ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.errors import Unauthenticated
from server.runtime.app import running_server
from tests.support import expect_error, make_config, rows_for_pair, status_details

AUDIENCE = "dialog-shard"
ISSUER = "https://issuer.test"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        entry = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        entry = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**entry, "kid": kid, "use": "sig"}


def write_jwks(path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the file atomically, as a key rotation job should."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    os.replace(tmp, path)


def claims(user_id: int, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": str(user_id), "iat": now, "exp": now + 300, "aud": AUDIENCE, "iss": ISSUER, **extra}


def sign(key: Any, algorithm: str, payload: dict[str, Any], kid: str | None) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key(payload: dict[str, Any], kid: str) -> str:
    """The classic algorithm-confusion forgery: HMAC keyed with the (public) RSA key's PEM."""
    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode()) + "."
    signing_input += b64(json.dumps(payload).encode())
    mac = hmac.new(public_pem(RSA_KEY), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def jwks_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "jwks.json"
    write_jwks(path, [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")])
    return path


@pytest_asyncio.fixture(scope="module")
async def jwks_stub(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str, jwks_path: Path
) -> AsyncIterator[dialog_service_pb2_grpc.DialogServiceAsyncStub]:
    """A server accepting RS256 and ES256 from the JWKS, and HS256 with its own secret."""
    config = make_config(
        [s.dsn for s in pg_servers],
        jwt_secret,
        auth={
            "algorithms": ["RS256", "ES256", "HS256"],
            "jwks_file": str(jwks_path),
            "jwt_secret": jwt_secret,
            "audience": AUDIENCE,
            "issuer": ISSUER,
        },
    )
    async with (
        running_server(config) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        yield dialog_service_pb2_grpc.DialogServiceStub(channel)


async def send(stub: Any, a: int, b: int, token: str, text: str = "hi") -> Any:
    return await stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text=text), metadata=bearer(token)
    )


async def test_rs256_and_es256_tokens_from_the_jwks_are_accepted(
    jwks_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    await send(jwks_stub, a, b, sign(RSA_KEY, "RS256", claims(a), "rsa-1"), "via rsa")
    await send(jwks_stub, a, b, sign(EC_KEY, "ES256", claims(a), "ec-1"), "via ec")
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert sorted(r[3] for r in rows) == ["via ec", "via rsa"]


async def test_hostile_asymmetric_tokens_are_unauthenticated(
    jwks_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
    jwt_secret: str,
) -> None:
    a, b = new_pair()
    valid = sign(RSA_KEY, "RS256", claims(a), "rsa-1")
    header, _, signature = valid.split(".")
    tampered_payload = b64(json.dumps(claims(a, admin=True)).encode())
    cases = {
        "unknown kid": (sign(RSA_KEY_2, "RS256", claims(a), "rsa-9"), "unknown signing key id"),
        "no kid": (sign(RSA_KEY, "RS256", claims(a), None), "key id (kid)"),
        "wrong key, known kid": (sign(RSA_KEY_2, "RS256", claims(a), "rsa-1"), "signature does not verify"),
        "tampered payload": (f"{header}.{tampered_payload}.{signature}", "signature does not verify"),
        "ES256 naming the RSA key": (sign(EC_KEY, "ES256", claims(a), "rsa-1"), "algorithm"),
        "RS512 not accepted": (sign(RSA_KEY, "RS512", claims(a), "rsa-1"), "algorithm"),
        "alg none": (jwt.encode(claims(a), "", algorithm="none", headers={"kid": "rsa-1"}), "algorithm"),
        "HS256 keyed with the public key": (
            hs256_with_public_key(claims(a), "rsa-1"),
            "signature does not verify",
        ),
        "expired": (sign(RSA_KEY, "RS256", claims(a, exp=int(time.time()) - 3600), "rsa-1"), "expired"),
        "future nbf": (
            sign(EC_KEY, "ES256", claims(a, nbf=int(time.time()) + 3600), "ec-1"),
            "not valid yet",
        ),
        "wrong audience": (sign(RSA_KEY, "RS256", claims(a, aud="someone-else"), "rsa-1"), "audience"),
        "wrong issuer": (sign(RSA_KEY, "RS256", claims(a, iss="https://evil.test"), "rsa-1"), "issuer"),
    }
    for name, (token, fragment) in cases.items():
        err = await expect_error(send(jwks_stub, a, b, token), grpc.StatusCode.UNAUTHENTICATED)
        details = err.details() or ""
        assert fragment in details, (name, details)
        # Nothing about keys: no key material, no kid echoed back, no secret.
        for secret in ("BEGIN", "rsa-1", "rsa-9", "ec-1", jwt_secret, public_pem(RSA_KEY).decode()[30:60]):
            assert secret not in details, (name, details)
        info, _ = status_details(err)
        assert info is not None and info.reason in {"TOKEN_INVALID", "TOKEN_KEY_UNKNOWN"}, name
    assert rows_for_pair(cluster_config, (a, b)) == {}


async def test_keys_rotate_by_kid_without_a_restart(
    jwks_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    jwks_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    new_token = sign(RSA_KEY_2, "RS256", claims(a), "rsa-2")
    err = await expect_error(send(jwks_stub, a, b, new_token), grpc.StatusCode.UNAUTHENTICATED)
    assert "unknown signing key id" in (err.details() or "")
    old_token = sign(RSA_KEY, "RS256", claims(a), "rsa-1")
    try:
        # The issuer publishes rsa-2 next to rsa-1, then withdraws rsa-1.
        write_jwks(jwks_path, [jwk(RSA_KEY, "rsa-1"), jwk(RSA_KEY_2, "rsa-2"), jwk(EC_KEY, "ec-1")])
        await send(jwks_stub, a, b, new_token, "new key")
        await send(jwks_stub, a, b, old_token, "old key")
        write_jwks(jwks_path, [jwk(RSA_KEY_2, "rsa-2"), jwk(EC_KEY, "ec-1")])
        err = await expect_error(send(jwks_stub, a, b, old_token), grpc.StatusCode.UNAUTHENTICATED)
        assert "unknown signing key id" in (err.details() or "")
        await send(jwks_stub, a, b, new_token, "new key again")
        # A broken file (a half-written update) keeps the last good keys instead of locking everyone out.
        await asyncio.to_thread(jwks_path.write_text, "{not json")
        await send(jwks_stub, a, b, new_token, "after a broken update")
    finally:
        write_jwks(jwks_path, [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")])
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert sorted(r[3] for r in rows) == ["after a broken update", "new key", "new key again", "old key"]


async def test_an_empty_jwks_withdraws_every_key_at_once(
    jwks_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    jwks_path: Path,
    new_pair: Callable[[], tuple[int, int]],
    jwt_secret: str,
) -> None:
    a, b = new_pair()
    rsa_token = sign(RSA_KEY, "RS256", claims(a), "rsa-1")
    ec_token = sign(EC_KEY, "ES256", claims(a), "ec-1")
    hs_token = jwt.encode(claims(a), jwt_secret, algorithm="HS256")
    for token in (rsa_token, ec_token):
        await send(jwks_stub, a, b, token, "before")  # verified, and remembered
    try:
        write_jwks(jwks_path, [])  # the issuer withdraws everything: {"keys": []}
        for token in (rsa_token, ec_token):
            err = await expect_error(send(jwks_stub, a, b, token), grpc.StatusCode.UNAUTHENTICATED)
            assert "unknown signing key id" in (err.details() or "")
            info, _ = status_details(err)
            assert info is not None and info.reason == "TOKEN_KEY_UNKNOWN"
        await send(jwks_stub, a, b, hs_token, "hs256 unaffected")
        # A file that is not a JWKS at all is a broken update, not a withdrawal: no key comes back.
        await asyncio.to_thread(jwks_path.write_text, '{"kees": []}')
        await expect_error(send(jwks_stub, a, b, rsa_token), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        write_jwks(jwks_path, [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1")])
    await send(jwks_stub, a, b, rsa_token, "after the keys are back")


async def test_hs256_tokens_still_work_next_to_public_keys(
    jwks_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    new_pair: Callable[[], tuple[int, int]],
    jwt_secret: str,
) -> None:
    a, b = new_pair()
    token = jwt.encode(claims(a), jwt_secret, algorithm="HS256")
    reply = await send(jwks_stub, a, b, token)
    assert reply.message.text == "hi"


def pem_auth(tmp_path: Path, key: Any, algorithms: list[str]) -> AuthConfig:
    path = tmp_path / "issuer.pem"
    path.write_bytes(public_pem(key))
    auth = {"algorithms": algorithms, "public_key_file": str(path), "issuer": ISSUER, "audience": AUDIENCE}
    return make_config(["postgresql://h/db"], "unused", auth=auth, page_token_secret="p" * 32).auth


def test_pem_public_key_verifies_rs256_and_refuses_confusion(tmp_path: Path) -> None:
    auth = pem_auth(tmp_path, RSA_KEY, ["RS256"])
    verifier = TokenVerifier(auth)
    payload = claims(7)
    assert verifier.verify(sign(RSA_KEY, "RS256", payload, None)).user_id == 7
    assert verifier.verify(sign(RSA_KEY, "RS256", payload, "any-kid")).user_id == 7  # no JWKS: kid is ignored
    for token, fragment in (
        (hs256_with_public_key(payload, "x"), "algorithm"),  # HS256 is not even accepted here
        (sign(RSA_KEY_2, "RS256", payload, None), "signature does not verify"),
        (jwt.encode(payload, "", algorithm="none"), "algorithm"),
    ):
        with pytest.raises(Unauthenticated) as caught:
            verifier.verify(token)
        assert fragment in caught.value.message
    with pytest.raises(ConfigError, match="no HS256 secret"):
        issue_token(auth, user_id=1)


def test_pem_ec_key_refuses_rs256_and_other_curves(tmp_path: Path) -> None:
    verifier = TokenVerifier(pem_auth(tmp_path, EC_KEY, ["ES256", "ES384"]))
    payload = claims(9)
    assert verifier.verify(sign(EC_KEY, "ES256", payload, None)).user_id == 9
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(Unauthenticated, match="algorithm"):
        verifier.verify(sign(p384, "ES384", payload, None))  # the configured key is P-256, not P-384


@pytest.mark.parametrize(
    ("auth", "fragment"),
    [
        ({"algorithms": ["none"], "jwt_secret": "k" * 32}, "got none"),
        ({"algorithms": ["RS256"]}, "exactly one of public_key_file and jwks_file"),
        ({"algorithms": ["RS256"], "public_key_file": "a.pem", "jwks_file": "b.json"}, "exactly one"),
        ({"jwt_secret": "k" * 32, "jwks_file": "b.json"}, "need an RS*, PS* or ES* algorithm"),
        (
            {"algorithms": ["ES256"], "jwks_file": "b.json", "issuer": ISSUER, "audience": AUDIENCE},
            "page_token_secret",
        ),
        # Public keys verify tokens for every service of the issuer: iss and aud must be pinned.
        ({"algorithms": ["ES256"], "jwks_file": "b.json"}, "jwks_file needs issuer and audience"),
        ({"algorithms": ["ES256"], "jwks_file": "b.json", "issuer": ISSUER}, "jwks_file needs audience"),
        (
            {"algorithms": ["RS256"], "public_key_file": "a.pem", "audience": AUDIENCE},
            "public_key_file needs issuer",
        ),
    ],
)
def test_key_configuration_mistakes_are_named(auth: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(["postgresql://h/db"], "unused", auth=auth)
    assert fragment in str(caught.value)


def test_unusable_key_files_fail_at_startup(tmp_path: Path) -> None:
    base = make_config(["postgresql://h/db"], "k" * 32).auth
    (tmp_path / "bad.pem").write_text("not a key")
    (tmp_path / "private.json").write_text(
        json.dumps({"keys": [{**jwk(EC_KEY, "ec-1"), "d": "AAAA"}]})  # a private JWK must not be published
    )
    for auth, fragment in (
        (replace(base, algorithms=("RS256",), public_key_file=tmp_path / "bad.pem"), "not a PEM public key"),
        (replace(base, algorithms=("RS256",), public_key_file=tmp_path / "missing.pem"), "cannot read"),
        (replace(base, algorithms=("ES256",), jwks_file=tmp_path / "private.json"), "private key"),
    ):
        with pytest.raises(ConfigError) as caught:
            TokenVerifier(auth)
        assert fragment in str(caught.value)
