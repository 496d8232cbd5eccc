"""`dialogctl`: the operator's command line for a dialog-shard server.

It reads the same TOML config as the server (by default the one
`dialog-server --dev` writes to `.data/dialog-shard.toml`), so it can mint
tokens with the server's key and call AdminService with an admin token::

    export TOKEN=$(dialogctl token --user 1)    # a user token for grpcurl
    dialogctl shard-of 1 2                      # where does the dialog of users 1 and 2 live?
    dialogctl shard-of --offline --shards 4 1 2 # the same from the hash alone, without a server
    dialogctl overrides set 1 2 3               # pin the pair to shard 3
    dialogctl overrides list --all
    dialogctl overrides delete 1 2
    dialogctl stats                             # messages per shard and how evenly they spread

Global options go before or after the subcommand (`dialogctl --json stats` or
`dialogctl stats --json`). `--json` prints one JSON document on stdout; RPC
responses use the proto3 JSON mapping with the proto field names (64-bit
integers are strings, as in grpcurl's output).

Exit codes: 0 success; 2 bad usage or configuration; 64 + the gRPC status code
when an RPC fails (the convention grpcurl uses, e.g. 67 for INVALID_ARGUMENT,
78 for UNAVAILABLE); 130 on Ctrl-C. Failures print one line
`dialogctl: <what went wrong>` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import jwt
import psycopg
from google.protobuf import json_format
from google.protobuf.message import Message

from client.gen.dialog.v1 import admin_service_pb2 as admin_pb
from client.gen.dialog.v1 import admin_service_pb2_grpc as admin_grpc
from server.auth import issue_token
from server.config import DEFAULT_LISTEN, ConfigError, ServerConfig, load_config
from server.dev import stack as devstack
from server.routing import Layout, bucket_of, pair_hash
from server.routing.distribution import DistributionSummary
from server.storage.layout import load_layout

# Besides `main`, what the subcommand modules (server/cli/*.py) build on.
__all__ = [
    "EXIT_CONFIG",
    "EXIT_INTERRUPTED",
    "RPC_EXIT_BASE",
    "CliError",
    "Session",
    "fail",
    "format_table",
    "int64_arg",
    "main",
    "message_dict",
    "page_size_arg",
    "print_json",
    "shard_id_arg",
    "source_name",
    "stored_layout",
]

PROG = "dialogctl"
#: Exit status of usage and configuration errors (argparse uses 2 as well).
EXIT_CONFIG = 2
#: Exit status of a failed RPC is this plus the numeric gRPC status code.
RPC_EXIT_BASE = 64
EXIT_INTERRUPTED = 130

_MAX_INT64 = 2**63 - 1
_MIN_INT64 = -(2**63)
_MAX_INT32 = 2**31 - 1
_DEFAULT_TIMEOUT = 10.0
_DEFAULT_TTL = 3600

_Response = TypeVar("_Response", bound=Message)


class CliError(Exception):
    """A failure reported as `dialogctl: <message>` with a given exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# -- argument types ---------------------------------------------------------------------------------


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
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


int64_arg = _int_in(_MIN_INT64, _MAX_INT64, "user id")
_user_id = _int_in(1, _MAX_INT64, "user id")
shard_id_arg = _int_in(-(2**31), _MAX_INT32, "shard id")
page_size_arg = _int_in(-(2**31), _MAX_INT32, "page size")
_shard_count = _int_in(1, _MAX_INT32, "shard count")
_ttl = _int_in(1, 10 * 365 * 24 * 3600, "ttl")


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout must be a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"timeout must be a positive number of seconds, got {text!r}")
    return value


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
    """What the subcommands share: parsed options, the config (loaded lazily) and one channel."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = args.json
        self.timeout: float = args.timeout
        self._config: ServerConfig | None = None
        self._channel: grpc.Channel | None = None

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

    def admin_stub(self) -> admin_grpc.AdminServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address())
        return admin_grpc.AdminServiceStub(self._channel)

    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        # Short-lived: the token only has to outlive this invocation.
        ttl = max(300, math.ceil(self.timeout) * 4)
        token = self.issue_token(admin=True, ttl_seconds=ttl)
        return (("authorization", f"Bearer {token}"),)

    def issue_token(self, *, user_id: int | None = None, admin: bool = False, ttl_seconds: int) -> str:
        try:
            return issue_token(self.config().auth, user_id=user_id, admin=admin, ttl_seconds=ttl_seconds)
        except ConfigError as exc:  # e.g. only public keys configured: tokens come from the issuer
            raise CliError(str(exc)) from None

    def call(self, method: grpc.UnaryUnaryMultiCallable[Any, _Response], request: Message) -> _Response:
        """One admin RPC with the deadline; a failure becomes a CliError with exit 64 + code."""
        metadata = self.admin_metadata()
        try:
            return method(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise _rpc_failure(exc) from None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def _rpc_failure(exc: grpc.RpcError) -> CliError:
    if isinstance(exc, grpc.Call):
        code = exc.code()
        details = exc.details() or ""
    else:  # pragma: no cover - every RpcError grpc raises for unary calls is also a Call
        code, details = grpc.StatusCode.UNKNOWN, str(exc)
    number: int = code.value[0]
    return CliError(f"{code.name}: {details}", RPC_EXIT_BASE + number)


# -- output -----------------------------------------------------------------------------------------


def message_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(document: object) -> None:
    print(json.dumps(document, indent=2))


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[int] = ()
) -> str:
    """Columns padded to their widest cell; the columns in `right` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _format_fields(fields: Sequence[tuple[str, object]]) -> str:
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


def source_name(source: int) -> str:
    return admin_pb.ShardSource.Name(source).removeprefix("SHARD_SOURCE_").lower()  # type: ignore[arg-type]


# -- subcommands ------------------------------------------------------------------------------------


def cmd_token(session: Session) -> int:
    args = session.args
    if args.user is None and not args.admin:
        args.subparser.error("say whom the token is for: --user ID, --admin, or both")
    token = session.issue_token(user_id=args.user, admin=args.admin, ttl_seconds=args.ttl)
    if session.json:
        claims = jwt.decode(token, options={"verify_signature": False})
        print_json({"token": token, "claims": claims})
    else:
        print(token)
    return 0


def cmd_shard_of(session: Session) -> int:
    args = session.args
    a, b = args.user_id_1, args.user_id_2
    if args.shards is not None and not args.offline:
        args.subparser.error("--shards only applies with --offline")
    if args.offline:
        return _shard_of_offline(session, a, b)
    response = session.call(
        session.admin_stub().ResolveShard, admin_pb.ResolveShardRequest(user_id_1=a, user_id_2=b)
    )
    if session.json:
        print_json(message_dict(response))
        return 0
    print(
        _format_fields(
            [
                ("pair", f"{min(a, b)} {max(a, b)}"),
                ("shard", response.shard_id),
                ("source", source_name(response.source)),
                ("hash shard", response.hash_shard_id),
                ("bucket", response.bucket),
            ]
        )
    )
    return 0


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


def _shard_of_offline(session: Session, a: int, b: int) -> int:
    args = session.args
    for value in (a, b):
        if not 1 <= value <= _MAX_INT64:
            args.subparser.error(f"user ids must be in 1..{_MAX_INT64}, got {value}")
    if a == b:
        args.subparser.error("a dialog is between two different users: the user ids must differ")
    layout = Layout(args.shards) if args.shards is not None else stored_layout(session)
    shards = layout.num_shards
    shard = layout.hash_shard(pair_hash(a, b))
    bucket = bucket_of(a, b)
    if session.json:
        print_json(
            {
                "shard_id": shard,
                "source": admin_pb.ShardSource.Name(admin_pb.SHARD_SOURCE_HASH),
                "hash_shard_id": shard,
                "bucket": bucket,
                "num_shards": shards,
                "offline": True,
            }
        )
        return 0
    print(
        _format_fields(
            [
                ("pair", f"{min(a, b)} {max(a, b)}"),
                ("shard", shard),
                ("source", "hash (offline: overrides not consulted)"),
                ("hash shard", shard),
                ("bucket", bucket),
                ("shards", shards),
            ]
        )
    )
    return 0


def _override_rows(overrides: Sequence[admin_pb.ShardOverride]) -> list[list[object]]:
    return [[o.user_id_1, o.user_id_2, o.shard_id, o.create_time.ToJsonString()] for o in overrides]


_OVERRIDE_HEADERS = ("USER_ID_1", "USER_ID_2", "SHARD", "CREATED")


def cmd_overrides_list(session: Session) -> int:
    args = session.args
    stub = session.admin_stub()
    token: str = args.page_token
    collected: list[admin_pb.ShardOverride] = []
    seen_tokens: set[str] = set()
    while True:
        response = session.call(
            stub.ListShardOverrides,
            admin_pb.ListShardOverridesRequest(page_size=args.page_size, page_token=token),
        )
        collected.extend(response.overrides)
        token = response.next_page_token
        if not args.all or not token:
            break
        if token in seen_tokens:
            raise CliError("the server returned the same page token twice; stopping", 1)
        seen_tokens.add(token)
    if session.json:
        document = message_dict(
            admin_pb.ListShardOverridesResponse(overrides=collected, next_page_token=token)
        )
        print_json(document)
        return 0
    if collected:
        print(format_table(_OVERRIDE_HEADERS, _override_rows(collected), right=(0, 1, 2)))
    print(f"{len(collected)} override{'' if len(collected) == 1 else 's'}")
    if token:
        print(f"more: dialogctl overrides list --page-token {token}   (or --all)")
    return 0


def cmd_overrides_set(session: Session) -> int:
    args = session.args
    request = admin_pb.SetShardOverrideRequest(
        user_id_1=args.user_id_1, user_id_2=args.user_id_2, shard_id=args.shard
    )
    response = session.call(session.admin_stub().SetShardOverride, request)
    if session.json:
        print_json(message_dict(response))
        return 0
    print(format_table(_OVERRIDE_HEADERS, _override_rows([response.override]), right=(0, 1, 2)))
    return 0


def cmd_overrides_delete(session: Session) -> int:
    args = session.args
    request = admin_pb.DeleteShardOverrideRequest(
        user_id_1=args.user_id_1, user_id_2=args.user_id_2, allow_missing=args.allow_missing
    )
    response = session.call(session.admin_stub().DeleteShardOverride, request)
    if session.json:
        print_json(message_dict(response))
        return 0
    low, high = sorted((args.user_id_1, args.user_id_2))
    print(f"pair {low} {high} has no override; it lives on its hash shard {response.shard_id}")
    return 0


def cmd_stats(session: Session) -> int:
    response = session.call(session.admin_stub().GetShardStats, admin_pb.GetShardStatsRequest())
    available = [s for s in response.shards if s.available]
    summary = DistributionSummary.summarize([s.message_count for s in available]) if available else None
    if session.json:
        document = message_dict(response)
        document["distribution"] = dataclasses.asdict(summary) if summary is not None else None
        print_json(document)
        return 0
    rows = [
        [
            s.shard_id,
            s.table_name,
            s.location,
            s.message_count,
            s.override_count,
            "yes" if s.available else "NO",
        ]
        for s in response.shards
    ]
    print(
        format_table(
            ("SHARD", "TABLE", "LOCATION", "MESSAGES", "OVERRIDES", "AVAILABLE"), rows, right=(0, 3, 4)
        )
    )
    print()
    fields: list[tuple[str, object]] = [
        ("shards", f"{response.num_shards} ({len(available)} available)"),
        ("overrides", response.override_count),
        ("messages total", response.total_message_count),
    ]
    if summary is not None:
        fields += [
            ("mean per shard", f"{summary.mean:.2f}"),
            ("min / max", f"{summary.minimum} / {summary.maximum}"),
            ("max/mean", f"{summary.max_mean_ratio:.4f}"),
            ("coeff. of variation", f"{summary.cv:.4f}"),
            ("chi-square", f"{summary.chi2:.3f} (df {summary.shards - 1})"),
            ("p-value (uniform)", f"{summary.p_value:.4g}"),
        ]
        if len(available) < response.num_shards:
            fields.append(("note", "figures cover the available shards only"))
    print(_format_fields(fields))
    return 0


# -- parser -----------------------------------------------------------------------------------------


def _add_global_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """The global options, on the top parser and (without defaults) on every subcommand.

    Subcommand copies default to SUPPRESS so that `dialogctl --json stats` is not reset by the
    subcommand parser, while `dialogctl stats --json` works too.
    """

    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--config",
        type=Path,
        default=default(None),
        help="server config file (default: $DIALOG_CONFIG, else .data/dialog-shard.toml if it exists)",
    )
    group.add_argument(
        "--address",
        metavar="HOST:PORT",
        default=default(None),
        help=f"server to call (default: the config's listen address, else {DEFAULT_LISTEN})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON document instead of tables",
    )
    group.add_argument(
        "--timeout",
        type=_timeout,
        metavar="SECONDS",
        default=default(_DEFAULT_TIMEOUT),
        help=f"RPC deadline in seconds (default: {_DEFAULT_TIMEOUT:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operate a dialog-shard server: tokens, shard placement, overrides and statistics.",
        epilog="Exit status: 0 ok, 2 usage/config error, 64 + gRPC status code when an RPC fails.",
    )
    _add_global_options(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        func: Callable[[Session], int],
        help_text: str,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text)
        _add_global_options(sub, top_level=False)
        sub.set_defaults(func=func, subparser=sub)
        return sub

    token = command(commands, "token", cmd_token, "print a JWT the configured server accepts")
    token.add_argument("--user", type=_user_id, metavar="ID", help="user the token acts as (the sub claim)")
    token.add_argument("--admin", action="store_true", help="grant AdminService (the admin claim)")
    token.add_argument(
        "--ttl",
        type=_ttl,
        default=_DEFAULT_TTL,
        metavar="SECONDS",
        help=f"lifetime (default: {_DEFAULT_TTL})",
    )

    shard_of = command(commands, "shard-of", cmd_shard_of, "tell which shard holds the dialog of two users")
    shard_of.add_argument("user_id_1", type=int64_arg, metavar="A")
    shard_of.add_argument("user_id_2", type=int64_arg, metavar="B")
    shard_of.add_argument(
        "--offline",
        action="store_true",
        help="compute the hash shard without a server (overrides not consulted)",
    )
    shard_of.add_argument(
        "--shards",
        type=_shard_count,
        metavar="N",
        help="number of shards for --offline (default: the layout in the config's control database)",
    )

    overrides = commands.add_parser(
        "overrides", help="list, set and delete shard overrides", description="Manage shard overrides."
    )
    _add_global_options(overrides, top_level=False)
    actions = overrides.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = command(actions, "list", cmd_overrides_list, "list shard overrides ordered by pair")
    listing.add_argument("--page-size", type=page_size_arg, default=0, metavar="N", help="overrides per page")
    listing.add_argument("--page-token", default="", metavar="TOKEN", help="continue after an earlier page")
    listing.add_argument("--all", action="store_true", help="follow next_page_token to the last page")

    setting = command(actions, "set", cmd_overrides_set, "pin a pair of users to a shard")
    setting.add_argument("user_id_1", type=int64_arg, metavar="A")
    setting.add_argument("user_id_2", type=int64_arg, metavar="B")
    setting.add_argument("shard", type=shard_id_arg, metavar="SHARD")

    deleting = command(actions, "delete", cmd_overrides_delete, "send a pair back to its hash shard")
    deleting.add_argument("user_id_1", type=int64_arg, metavar="A")
    deleting.add_argument("user_id_2", type=int64_arg, metavar="B")
    deleting.add_argument(
        "--allow-missing", action="store_true", help="succeed when the pair has no override"
    )

    command(commands, "stats", cmd_stats, "messages and overrides per shard, and how evenly they spread")

    # Imported here: these modules import this one.
    from server.cli import backup, hotspots, messages, migrate, moves, reshard, verify

    for extension in (messages, migrate, backup, verify, reshard, hotspots, moves):
        extension.register(commands, command)
    return parser


def fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    session = Session(args)
    try:
        code: int = args.func(session)
        sys.stdout.flush()
        return code
    except CliError as exc:
        return fail(exc.message, exc.exit_code)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `dialogctl ... | head`: the reader left; do not let the interpreter complain at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
