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
from server.interceptors._wrap import Behavior, Continuation, wrap_unary_unary

DIALOG_SERVICE_PREFIX = "/dialog.v1.DialogService/"
ADMIN_SERVICE_PREFIX = "/dialog.v1.AdminService/"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the bearer token of protected methods before the servicer runs."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        admin_only = method.startswith(ADMIN_SERVICE_PREFIX)
        handler = await continuation(handler_call_details)
        if handler is None or not (admin_only or method.startswith(DIALOG_SERVICE_PREFIX)):
            return handler
        header = next(
            (str(v) for k, v in (handler_call_details.invocation_metadata or ()) if k == "authorization"),
            None,
        )
        verifier = self._verifier

        def wrap(behavior: Behavior) -> Behavior:
            async def authenticated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                principal: Principal = verifier.verify_header(header)
                if admin_only and not principal.admin:
                    raise PermissionDenied(
                        "AdminService needs a token with the admin claim", reason="ADMIN_REQUIRED"
                    )
                current_principal.set(principal)
                return await behavior(request, context)

            return authenticated

        return wrap_unary_unary(handler, wrap)
