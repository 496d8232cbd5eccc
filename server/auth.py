"""Bearer-token verification (PyJWT) and the caller identity it yields.

`sub` is the acting user id (a decimal string or number); a true value in the
configured admin claim grants AdminService. Error messages say what is wrong
with the token and never anything about keys.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass
from typing import Any

import jwt

from server.config import AuthConfig
from server.errors import Unauthenticated


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller."""

    #: The user the caller acts as, or None for a token without a user (admin tools).
    user_id: int | None
    admin: bool


#: The caller of the RPC being handled; set by the auth interceptor.
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal")


_JWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the bearer token has expired"),
    (jwt.ImmatureSignatureError, "the bearer token is not valid yet (nbf/iat in the future)"),
    (jwt.InvalidAudienceError, "the bearer token is for another audience (aud)"),
    (jwt.InvalidIssuerError, "the bearer token has the wrong issuer (iss)"),
    (jwt.MissingRequiredClaimError, "the bearer token lacks a required claim"),
    (jwt.InvalidSignatureError, "the bearer token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the bearer token is signed with an algorithm this server does not accept"),
    (jwt.DecodeError, "the bearer token is malformed (expected a JWT: header.payload.signature)"),
)


class TokenVerifier:
    """Verifies `authorization: Bearer <JWT>` values against the configured key."""

    def __init__(self, config: AuthConfig) -> None:
        self._config = config

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

    def verify(self, token: str) -> Principal:
        config = self._config
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                config.jwt_secret,
                algorithms=list(config.algorithms),
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
        return Principal(user_id=user_id, admin=admin)


def issue_token(
    config: AuthConfig,
    *,
    user_id: int | None = None,
    admin: bool = False,
    ttl_seconds: int = 3600,
    extra_claims: dict[str, Any] | None = None,
) -> str:
    """A token the server configured with `config` accepts (for dev tooling and tests)."""
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
    return jwt.encode(claims, config.jwt_secret, algorithm=config.algorithms[0])
