"""Authentication and coarse authorization for DialogService and AdminService.

Every call to those services needs a valid bearer token; AdminService also
needs the admin claim. Health and reflection stay open so probes and grpcurl
work without credentials. The verified caller is put in `current_principal`
for the servicers' per-request checks (acting user = from_user_id, ...).
"""

from __future__ import annotations

from typing import Any

import grpc

from server.auth import Principal, TokenVerifier, current_principal
from server.errors import PermissionDenied
from server.interceptors._wrap import CallCheck, Check, metadata_value

DIALOG_SERVICE_PREFIX = "/dialog.v1.DialogService/"
ADMIN_SERVICE_PREFIX = "/dialog.v1.AdminService/"


class AuthInterceptor(CallCheck):
    """Verifies the bearer token of protected methods before the servicer runs."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    def check(self, method: str) -> Check | None:
        admin_only = method.startswith(ADMIN_SERVICE_PREFIX)
        if not (admin_only or method.startswith(DIALOG_SERVICE_PREFIX)):
            return None  # health and reflection stay open
        # Unary and server-streaming methods alike (server.interceptors._wrap); the protected
        # services define no client-streaming method, which would pass unauthenticated
        # (tests/test_proto_stubs.py checks).
        verify_header = self._verifier.verify_header

        def authenticate(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            principal: Principal = verify_header(metadata_value(context, "authorization"))
            if admin_only and not principal.admin:
                raise PermissionDenied(
                    "AdminService needs a token with the admin claim", reason="ADMIN_REQUIRED"
                )
            current_principal.set(principal)

        return authenticate
