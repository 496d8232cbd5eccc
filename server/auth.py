"""Bearer-token verification (PyJWT) and the caller identity it yields.

`sub` is the acting user id, a string in canonical decimal form (`"42"`; not
`"042"`, `"+42"`, `"4_2"`, other scripts' digits or a JSON number) within int64;
a true value in the configured admin claim grants AdminService. A token's
lifetime (`exp - iat`) is bounded (`[auth] max_token_lifetime_seconds`, shorter
for admin tokens), and a token whose `jti` or `kid` is listed in the revocation
file is refused (`TOKEN_REVOKED`), also when it was verified before. Error
messages say what is wrong with the token and never anything about keys.

Keys: HS* tokens verify only against the shared secret, RS*/PS*/ES* tokens only
against a public key (a PEM file, or the JWKS entry named by the token's `kid`)
of the matching type. Choosing the key by the algorithm family, and never
passing a public key to HMAC, is what defeats algorithm confusion; `none` is
never accepted. A JWKS file is re-read as soon as it changes (replace it
atomically), so keys are added and withdrawn without a restart; `{"keys": []}`
withdraws every key, while a file that cannot be read or parsed keeps the last
good keys (with a warning). The revocation file is watched the same way.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

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

    def log_label(self) -> str:
        """How the RPC log names the caller: `user:42`, `admin` or `admin+user:42` (never the token)."""
        user = f"user:{self.user_id}" if self.user_id is not None else ""
        if self.admin:
            return f"admin+{user}" if user else "admin"
        return user


#: The caller of the RPC being handled: set by the auth interceptor; None before (or without) it.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)

#: A user id as `sub` must spell it: canonical decimal, ASCII digits, no sign or leading zero.
_USER_ID = re.compile(r"[1-9][0-9]{0,18}")
_MAX_USER_ID = 2**63 - 1
_BAD_SUB = (
    "the bearer token's sub claim must be a user id in canonical decimal form "
    '(a string such as "42": ASCII digits, no sign, leading zeros or separators, at most 2^63-1)'
)


_MALFORMED = "the bearer token is malformed (expected a JWT: header.payload.signature)"
_WRONG_ALGORITHM = "the bearer token is signed with an algorithm this server does not accept"

_JWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the bearer token has expired"),
    (jwt.ImmatureSignatureError, "the bearer token is not valid yet (nbf/iat in the future)"),
    (jwt.InvalidAudienceError, "the bearer token is for another audience (aud)"),
    (jwt.InvalidIssuerError, "the bearer token has the wrong issuer (iss)"),
    (jwt.MissingRequiredClaimError, "the bearer token lacks a required claim"),
    (jwt.exceptions.InvalidJTIError, "the bearer token's jti claim must be a string"),
    (jwt.InvalidIssuedAtError, "the bearer token's iat claim must be a number (seconds since the epoch)"),
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


def _read_json(path: Path, what: str) -> Any:
    """The JSON document in `path`; ConfigError names the `what` file and what is wrong with it."""
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"the {what} {path} is not valid JSON") from None


def load_jwks(path: Path) -> dict[str, PublicKey]:
    """The public keys of a JWKS file by `kid`; private parts and keys of other types are refused.

    `{"keys": []}` is valid and withdraws every key.
    """
    data = _read_json(path, "JWKS file")
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
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
    if not keys:
        log.warning("the JWKS file %s lists no keys: every RS*/PS*/ES* token is refused", path)
    return keys


@dataclass(frozen=True, slots=True)
class Revocations:
    """Revoked token ids (`jti`) and signing key ids (`kid`)."""

    jti: frozenset[str] = frozenset()
    kid: frozenset[str] = frozenset()


def load_revocations(path: Path) -> Revocations:
    """The revocation file: `{"jti": ["..."], "kid": ["..."]}` (either list may be left out)."""
    data = _read_json(path, "revocation file")
    if not isinstance(data, dict) or set(data) - {"jti", "kid"}:
        raise ConfigError(f'the revocation file {path} must be an object with "jti" and/or "kid" lists')
    lists: dict[str, frozenset[str]] = {}
    for name in ("jti", "kid"):
        values = data.get(name, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f'"{name}" in the revocation file {path} must be a list of non-empty strings')
        lists[name] = frozenset(values)
    return Revocations(jti=lists["jti"], kid=lists["kid"])


_T = TypeVar("_T")


class _WatchedFile(Generic[_T]):
    """What `load` makes of a file, made again whenever the file changes (no restart needed).

    A file that cannot be loaded at construction is a ConfigError; later, a change that cannot be
    loaded (a half-written or broken file) or a removed file keeps the last good value, with a warning.
    """

    def __init__(self, path: Path, load: Callable[[Path], _T], what: str) -> None:
        self._path = path
        self._load = load
        self._what = what
        self._stamp = self._current_stamp()
        self._value = load(path)

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def current(self) -> _T:
        # One stat per call (about a microsecond) makes a change apply at once; the file is parsed
        # only when it changed, so callers cannot make the server re-read it at will.
        stamp = self._current_stamp()
        if stamp is None:
            if self._stamp is not None:  # warn once; the file coming back is a change again
                log.warning("keeping the previous %s: %s is gone", self._what, self._path)
                self._stamp = None
        elif stamp != self._stamp:
            try:
                self._value = self._load(self._path)
            except ConfigError as exc:
                log.warning("keeping the previous %s: %s", self._what, exc)
            else:
                log.info("reloaded the %s from %s", self._what, self._path)
            self._stamp = stamp
        return self._value


class TokenVerifier:
    """Verifies `authorization: Bearer <JWT>` values against the configured keys.

    Construction loads the key files and raises ConfigError if they are unusable.
    """

    #: Verified tokens remembered (clients send the same token on every call); beyond, start over.
    MAX_REMEMBERED = 10_000

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._public_key = load_public_key(config.public_key_file) if config.public_key_file else None
        self._jwks = _WatchedFile(config.jwks_file, load_jwks, "JWT keys") if config.jwks_file else None
        self._revocations = (
            _WatchedFile(config.revocation_file, load_revocations, "revoked tokens and keys")
            if config.revocation_file
            else None
        )
        # token -> (key it was verified with, expiry incl. leeway, principal, header alg and kid, jti).
        # A hit skips only parsing the header and the signature and claim checks: the key is still
        # looked up per call (a withdrawn kid fails at once) and must be the very key object that
        # verified the token; expiry and revocation are checked again.
        self._verified: dict[str, tuple[object, float, Principal, object, object, object]] = {}

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
            key = self._jwks.current().get(kid)
            if key is None:
                raise Unauthenticated("unknown signing key id", reason="TOKEN_KEY_UNKNOWN")
        else:
            key = self._public_key
        if key is None or not _fits(key, algorithm):
            raise Unauthenticated(_WRONG_ALGORITHM, reason="TOKEN_INVALID")
        return algorithm, key

    def _check_revoked(self, jti: object, kid: object) -> None:
        if self._revocations is None:
            return
        revoked = self._revocations.current()
        if isinstance(jti, str) and jti in revoked.jti:
            raise Unauthenticated("the bearer token has been revoked", reason="TOKEN_REVOKED")
        if isinstance(kid, str) and kid in revoked.kid:
            raise Unauthenticated("the bearer token's signing key has been revoked", reason="TOKEN_REVOKED")

    def verify(self, token: str) -> Principal:
        config = self._config
        remembered = self._verified.get(token)
        if remembered is not None:
            # The same token string has the same header: its parse is remembered too.
            verified_with, expires, principal, header_alg, header_kid, jti = remembered
            if self._key_of(header_alg, header_kid)[1] is verified_with and time.time() < expires:
                self._check_revoked(jti, header_kid)
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
                # sub is checked below, with a message saying how to spell it.
                options={"require": ["exp"], "verify_aud": config.audience is not None, "verify_sub": False},
            )
        except jwt.PyJWTError as exc:
            for error_type, message in _JWT_ERRORS:
                if isinstance(exc, error_type):
                    if isinstance(exc, jwt.MissingRequiredClaimError):
                        message = f"the bearer token lacks the required claim {exc.claim!r}"
                    raise Unauthenticated(message, reason="TOKEN_INVALID") from None
            raise Unauthenticated("the bearer token is invalid", reason="TOKEN_INVALID") from None
        admin = claims.get(config.admin_claim) is True
        user_id: int | None = None
        if "sub" in claims:
            user_id = _user_id(claims["sub"])
        elif not admin:
            raise Unauthenticated("the bearer token has no sub claim naming the user", reason="TOKEN_INVALID")
        _check_lifetime(claims, config.max_lifetime(admin), admin)
        jti = claims.get("jti")
        self._check_revoked(jti, header_kid)
        principal = Principal(user_id=user_id, admin=admin)
        if len(self._verified) >= self.MAX_REMEMBERED:
            self._verified.clear()
        self._verified[token] = (
            key,
            float(claims["exp"]) + config.leeway_seconds,
            principal,
            header_alg,
            header_kid,
            jti,
        )
        return principal


def _user_id(sub: object) -> int:
    """The user id `sub` names, if it is spelled canonically; else UNAUTHENTICATED."""
    if not isinstance(sub, str):
        raise Unauthenticated(
            f'the bearer token\'s sub claim must be a string holding the user id ("42"), not a JSON '
            f"{_json_type(sub)}",
            reason="TOKEN_INVALID",
        )
    if not _USER_ID.fullmatch(sub) or int(sub) > _MAX_USER_ID:
        raise Unauthenticated(_BAD_SUB, reason="TOKEN_INVALID")
    return int(sub)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


def _check_lifetime(claims: dict[str, Any], limit: float, admin: bool) -> None:
    """Refuse a token living longer than `limit` seconds (0: no limit), or not saying when it was issued."""
    if not limit:
        return
    kind = "admin tokens" if admin else "user tokens"
    if "iat" not in claims:
        raise Unauthenticated(
            f"the bearer token lacks the required claim 'iat' (this server limits the lifetime of {kind})",
            reason="TOKEN_INVALID",
        )
    # PyJWT has checked that exp and iat are numbers.
    lifetime = float(claims["exp"]) - float(claims["iat"])
    if lifetime > limit:
        raise Unauthenticated(
            f"the bearer token lives {lifetime:g} s (exp - iat), longer than the {limit:g} s this server "
            f"accepts for {kind}",
            reason="TOKEN_INVALID",
        )


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
    limit = config.max_lifetime(admin)
    if limit and ttl_seconds > limit:
        kind = "admin" if admin else "user"
        setting = "max_admin_token_lifetime_seconds" if admin else "max_token_lifetime_seconds"
        raise ConfigError(
            f"a token living {ttl_seconds} s would be refused: the server accepts {kind} tokens "
            f"living at most {limit:g} s ([auth] {setting})"
        )
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
