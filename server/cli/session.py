"""The ground of every dialogctl subcommand: the session (options, config, channel), errors, argument types.

The subcommand modules (server/cli/*.py) import this module and `server.cli.output`, never
`server.cli.dialogctl`, which imports them to build its parser.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path

import psycopg

from client import AdminClient, ChannelSecurity
from server.auth import issue_token
from server.config import ConfigError, ServerConfig, load_config, read_pem
from server.dev import stack as devstack
from server.routing import Layout
from server.storage.layout import load_layout

#: Exit status of usage and configuration errors (argparse uses 2 as well).
EXIT_CONFIG = 2
#: Exit status of a failed RPC is this plus the numeric gRPC status code.
RPC_EXIT_BASE = 64
EXIT_INTERRUPTED = 130

MAX_INT64 = 2**63 - 1
_MIN_INT64 = -(2**63)
_MAX_INT32 = 2**31 - 1


class CliError(Exception):
    """A failure reported as `dialogctl: <message>` with a given exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# -- argument types ---------------------------------------------------------------------------------


def int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in low..high, named `what` in its messages."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be in {low}..{high}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


int64_arg = int_in(_MIN_INT64, MAX_INT64, "user id")
shard_id_arg = int_in(-(2**31), _MAX_INT32, "shard id")
page_size_arg = int_in(-(2**31), _MAX_INT32, "page size")


# -- configuration and connection -------------------------------------------------------------------


def default_config_path() -> Path | None:
    """`$DIALOG_CONFIG`, else the config `dialog-server --dev` writes, if it exists."""
    env = os.environ.get("DIALOG_CONFIG")
    if env:
        return Path(env)
    dev = devstack.default_data_dir() / devstack.CONFIG_NAME
    return dev if dev.is_file() else None


def connect_address(listen: str) -> str:
    """The address to dial for a server listening on `listen` (wildcards become loopback)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise CliError(f"cannot tell the server's port from its listen address {listen!r}; pass --address")
    if port == "0":
        raise CliError(f"the config listens on {listen!r} (a random port); pass --address HOST:PORT")
    if host in ("", "*", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


class Session:
    """What the subcommands share: parsed options, the config (loaded lazily) and one AdminClient."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = args.json
        self.timeout: float = args.timeout
        self._config: ServerConfig | None = None
        self._admin: AdminClient | None = None
        #: `HOST:PORT over <transport>` once the client is connected, for error messages.
        self.connection: str | None = None

    def config(self) -> ServerConfig:
        if self._config is None:
            explicit: Path | None = self.args.config
            path = explicit if explicit is not None else default_config_path()
            try:
                self._config = load_config(path, os.environ)
            except ConfigError as exc:
                if path is None:
                    raise CliError(
                        "no config file: pass --config PATH, set DIALOG_CONFIG, or start "
                        "`dialog-server --dev` (it writes .data/dialog-shard.toml); "
                        f"the environment alone is not enough: {exc}"
                    ) from None
                raise CliError(str(exc)) from None
            except OSError as exc:
                raise CliError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
            except (TypeError, ValueError) as exc:
                raise CliError(f"the config file {path} has an invalid value: {exc}") from None
        return self._config

    def address(self) -> str:
        given: str | None = self.args.address
        if given:
            return given
        # The config's `listen` defaults to DEFAULT_LISTEN when the file does not set it.
        return connect_address(self.config().listen)

    def security(self) -> ChannelSecurity:
        """TLS or plaintext: the flags win over the config's [tls] section, which means TLS when present.

        --ca-cert replaces [tls] server_ca_file, --client-cert/--client-key replace client_cert_file/
        client_key_file; without [tls], --ca-cert, --client-cert or --server-name ask for TLS.
        """
        args = self.args
        tls_flags = {
            "--ca-cert": args.ca_cert,
            "--client-cert": args.client_cert,
            "--client-key": args.client_key,
            "--server-name": args.server_name,
        }
        if args.plaintext:
            given = [flag for flag, value in tls_flags.items() if value is not None]
            if given:
                raise CliError(f"--plaintext cannot be combined with {', '.join(given)}")
            return ChannelSecurity(plaintext=True)
        if (args.client_cert is None) != (args.client_key is None):
            raise CliError("--client-cert and --client-key go together")
        tls = self.config().tls
        if tls is None and not any(value is not None for value in tls_flags.values()):
            return ChannelSecurity(plaintext=True)
        ca, ca_what = args.ca_cert, "--ca-cert"
        if ca is None and tls is not None:
            ca, ca_what = tls.server_ca_file, "[tls] server_ca_file"
        cert, cert_what = args.client_cert, "--client-cert"
        key, key_what = args.client_key, "--client-key"
        if cert is None and tls is not None:
            cert, cert_what = tls.client_cert_file, "[tls] client_cert_file"
            key, key_what = tls.client_key_file, "[tls] client_key_file"
        return ChannelSecurity(
            root_certificates=_read_pem(ca, ca_what) if ca is not None else None,
            client_cert_chain=_read_pem(cert, cert_what) if cert is not None else None,
            client_private_key=_read_pem(key, key_what) if key is not None else None,
        )

    def admin(self) -> AdminClient:
        """The AdminService client, connected on first use; every call carries a fresh admin token.

        Its failures are `DialogShardError`s, which `dialogctl.main` turns into exit 64 + code.
        """
        if self._admin is None:
            # Short-lived: a token only has to outlive the call it is minted for, and must stay
            # within the lifetime the server accepts for admin tokens.
            ttl = max(300, math.ceil(self.timeout) * 4)
            limit = self.config().auth.max_admin_token_lifetime_seconds
            mint = functools.partial(
                self.issue_token, admin=True, ttl_seconds=min(ttl, math.floor(limit)) if limit else ttl
            )
            mint()  # a config that cannot sign tokens fails here, as a CliError, not inside a call
            server_name: str | None = self.args.server_name
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            address, security = self.address(), self.security()
            self._admin = AdminClient.connect(
                address, security, token=mint, timeout=self.timeout, options=options
            )
            self.connection = f"{address} over {_transport(security)}"
        return self._admin

    def issue_token(self, *, user_id: int | None = None, admin: bool = False, ttl_seconds: int) -> str:
        try:
            return issue_token(self.config().auth, user_id=user_id, admin=admin, ttl_seconds=ttl_seconds)
        except ConfigError as exc:  # e.g. only public keys configured: tokens come from the issuer
            raise CliError(str(exc)) from None

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None


def _transport(security: ChannelSecurity) -> str:
    if security.plaintext:
        return "plaintext"
    if security.client_cert_chain is None:
        return "TLS without a client certificate"
    return "TLS with a client certificate"


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return read_pem(path, what)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def stored_layout(session: Session) -> Layout:
    """The layout the servers route by, read from the control database named in the config.

    Not the config's shard count: every config lists the shards a reshard has not reached
    yet (and, after shrinking, those it left), and a running reshard routes moved units by
    its new count.
    """
    try:
        dsn = session.config().control_dsn
    except CliError as exc:
        raise CliError(
            f"--offline needs --shards N or a config naming the control database: {exc.message}"
        ) from None

    async def read() -> Layout:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=5) as conn:
            return await load_layout(conn)

    try:
        return asyncio.run(read())
    except (psycopg.Error, LookupError) as exc:
        raise CliError(
            f"cannot read the shard layout from the control database ({exc}); pass --shards N"
        ) from None
