"""Bearer-token verification (PyJWT) and the caller identity it yields.

`sub` is the acting user id (a decimal string or number); a true value in the
configured admin claim grants AdminService. Error messages say what is wrong
with the token and never anything about keys.

Keys: HS* tokens verify only against the shared secret, RS*/PS*/ES* tokens only
against a public key (a PEM file, or the JWKS entry named by the token's `kid`)
of the matching type. Choosing the key by the algorithm family, and never
passing a public key to HMAC, is what defeats algorithm confusion; `none` is
never accepted. A JWKS file is re-read as soon as it changes (replace it
atomically), so keys are added and withdrawn without a restart.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from server.config import HMAC_ALGORITHMS, AuthConfig, ConfigError
from server.errors import Unauthenticated

log = logging.getLogger(__name__)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller."""

    #: The user the caller acts as, or None for a token without a user (admin tools).
    user_id: int | None
    admin: bool


#: The caller of the RPC being handled; set by the auth interceptor.
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal")


_MALFORMED = "the bearer token is malformed (expected a JWT: header.payload.signature)"
_WRONG_ALGORITHM = "the bearer token is signed with an algorithm this server does not accept"

_JWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the bearer token has expired"),
    (jwt.ImmatureSignatureError, "the bearer token is not valid yet (nbf/iat in the future)"),
    (jwt.InvalidAudienceError, "the bearer token is for another audience (aud)"),
    (jwt.InvalidIssuerError, "the bearer token has the wrong issuer (iss)"),
    (jwt.MissingRequiredClaimError, "the bearer token lacks a required claim"),
    (jwt.InvalidSignatureError, "the bearer token's signature does not verify"),
    (jwt.InvalidAlgorithmError, _WRONG_ALGORITHM),
    (jwt.DecodeError, _MALFORMED),
)


def _fits(key: PublicKey, algorithm: str) -> bool:
    """Whether `key` is the kind of key `algorithm` verifies with (RSA for RS/PS, the right curve for ES)."""
    if algorithm.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    curve = _EC_CURVES.get(algorithm)
    return curve is not None and isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, curve)


def load_public_key(path: Path) -> PublicKey:
    """An RSA or EC public key from a PEM file; ConfigError says what is wrong with the file."""
    try:
        key = load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the JWT public key file {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"the public key in {path} is neither RSA nor EC")
    return key


def load_jwks(path: Path) -> dict[str, PublicKey]:
    """The public keys of a JWKS file by `kid`; private parts and keys of other types are refused."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the JWKS file {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"the JWKS file {path} is not valid JSON") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'the JWKS file {path} has no "keys" list')
    keys: dict[str, PublicKey] = {}
    for index, entry in enumerate(entries):
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not kid:
            raise ConfigError(f'key {index} of the JWKS file {path} has no "kid"')
        if "d" in entry:
            raise ConfigError(
                f"key {kid!r} of the JWKS file {path} is a private key; publish public keys only"
            )
        if kid in keys:
            raise ConfigError(f"the JWKS file {path} lists the kid {kid!r} twice")
        try:
            key = jwt.PyJWK(entry).key
        except jwt.PyJWTError as exc:
            raise ConfigError(f"key {kid!r} of the JWKS file {path} is unusable: {exc}") from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ConfigError(f"key {kid!r} of the JWKS file {path} is neither an RSA nor an EC public key")
        keys[kid] = key
    return keys


class _JwksFile:
    """The keys of a JWKS file, re-read whenever the file changes (rotation without a restart)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp = self._current_stamp()
        self._keys = load_jwks(path)

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def get(self, kid: str) -> PublicKey | None:
        # One stat per lookup (about a microsecond) makes a removed key stop verifying at once;
        # the file is parsed only when it changed, so made-up kids cannot make the server re-read it.
        stamp = self._current_stamp()
        if stamp is not None and stamp != self._stamp:
            try:
                self._keys = load_jwks(self._path)
            except ConfigError as exc:
                log.warning("keeping the previous JWT keys: %s", exc)
            else:
                log.info("reloaded %d JWT keys from %s", len(self._keys), self._path)
            self._stamp = stamp
        return self._keys.get(kid)


class TokenVerifier:
    """Verifies `authorization: Bearer <JWT>` values against the configured keys.

    Construction loads the key files and raises ConfigError if they are unusable.
    """

    #: Verified tokens remembered (clients send the same token on every call); beyond, start over.
    MAX_REMEMBERED = 10_000

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._public_key = load_public_key(config.public_key_file) if config.public_key_file else None
        self._jwks = _JwksFile(config.jwks_file) if config.jwks_file else None
        # token -> (key it was verified with, expiry incl. leeway, principal, header alg and kid).
        # A hit skips only parsing the header and the signature and claim checks: the key is still
        # looked up per call (a withdrawn kid fails at once) and must be the very key object that
        # verified the token; expiry is checked again.
        self._verified: dict[str, tuple[object, float, Principal, object, object]] = {}

    def verify_header(self, value: str | None) -> Principal:
        if not value:
            raise Unauthenticated(
                "missing credentials: send metadata `authorization: Bearer <JWT>`", reason="TOKEN_MISSING"
            )
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "the authorization metadata must be `Bearer <JWT>`", reason="TOKEN_MALFORMED"
            )
        return self.verify(token.strip())

    @staticmethod
    def _header(token: str) -> dict[str, Any]:
        """The token's (unverified) JOSE header."""
        try:
            return jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated(_MALFORMED, reason="TOKEN_INVALID") from None

    def _key_of(self, algorithm: object, kid: object) -> tuple[str, bytes | PublicKey]:
        """The one key that may verify a token whose header names `algorithm` and `kid`."""
        if not isinstance(algorithm, str) or algorithm not in self._config.algorithms:
            raise Unauthenticated(_WRONG_ALGORITHM, reason="TOKEN_INVALID")
        if algorithm in HMAC_ALGORITHMS and self._config.jwt_secret is not None:
            return algorithm, self._config.jwt_secret
        key: PublicKey | None = None
        if self._jwks is not None:
            if not isinstance(kid, str) or not kid:
                raise Unauthenticated(
                    "the bearer token's header lacks a key id (kid)", reason="TOKEN_INVALID"
                )
            key = self._jwks.get(kid)
            if key is None:
                raise Unauthenticated("unknown signing key id", reason="TOKEN_KEY_UNKNOWN")
        else:
            key = self._public_key
        if key is None or not _fits(key, algorithm):
            raise Unauthenticated(_WRONG_ALGORITHM, reason="TOKEN_INVALID")
        return algorithm, key

    def verify(self, token: str) -> Principal:
        config = self._config
        remembered = self._verified.get(token)
        if remembered is not None:
            # The same token string has the same header: its parse is remembered too.
            verified_with, expires, principal, header_alg, header_kid = remembered
            if self._key_of(header_alg, header_kid)[1] is verified_with and time.time() < expires:
                return principal
        header = self._header(token)
        header_alg, header_kid = header.get("alg"), header.get("kid")
        algorithm, key = self._key_of(header_alg, header_kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway_seconds,
                options={"require": ["exp"], "verify_aud": config.audience is not None},
            )
        except jwt.PyJWTError as exc:
            for error_type, message in _JWT_ERRORS:
                if isinstance(exc, error_type):
                    if isinstance(exc, jwt.MissingRequiredClaimError):
                        message = f"the bearer token lacks the required claim {exc.claim!r}"
                    raise Unauthenticated(message, reason="TOKEN_INVALID") from None
            raise Unauthenticated("the bearer token is invalid", reason="TOKEN_INVALID") from None
        admin = claims.get(config.admin_claim) is True
        sub = claims.get("sub")
        user_id: int | None = None
        if sub is not None and sub != "":
            try:
                user_id = int(sub)
            except (TypeError, ValueError):
                raise Unauthenticated(
                    "the bearer token's sub claim must be a user id (a positive integer)",
                    reason="TOKEN_INVALID",
                ) from None
            if not 1 <= user_id <= 2**63 - 1:
                raise Unauthenticated(
                    "the bearer token's sub claim must be a user id in 1..2^63-1", reason="TOKEN_INVALID"
                )
        elif not admin:
            raise Unauthenticated("the bearer token has no sub claim naming the user", reason="TOKEN_INVALID")
        principal = Principal(user_id=user_id, admin=admin)
        if len(self._verified) >= self.MAX_REMEMBERED:
            self._verified.clear()
        self._verified[token] = (
            key,
            float(claims["exp"]) + config.leeway_seconds,
            principal,
            header_alg,
            header_kid,
        )
        return principal


def issue_token(
    config: AuthConfig,
    *,
    user_id: int | None = None,
    admin: bool = False,
    ttl_seconds: int = 3600,
    extra_claims: dict[str, Any] | None = None,
) -> str:
    """A token the server configured with `config` accepts (for dev tooling and tests).

    Needs the shared secret: with public keys only, tokens come from the issuer that holds the private key.
    """
    algorithm = next((a for a in config.algorithms if a in HMAC_ALGORITHMS), None)
    if config.jwt_secret is None or algorithm is None:
        raise ConfigError("cannot issue tokens: no HS256 secret is configured (tokens come from your issuer)")
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "nbf": now, "exp": now + ttl_seconds}
    if user_id is not None:
        claims["sub"] = str(user_id)
    if admin:
        claims[config.admin_claim] = True
    if config.issuer:
        claims["iss"] = config.issuer
    if config.audience:
        claims["aud"] = config.audience
    claims.update(extra_claims or {})
    return jwt.encode(claims, config.jwt_secret, algorithm=algorithm)
