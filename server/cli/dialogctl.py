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
    dialogctl stats                             # messages per shard (estimated) and how evenly they spread
    dialogctl stats --exact                     # the same, counted exactly shard by shard

RPC commands call AdminService through `client.AdminClient` (its paging, retries of
UNAVAILABLE within the --timeout deadline, and error mapping). They speak TLS when the
config has a [tls] section (trusting its server_ca_file, presenting its client_cert_file
and client_key_file for mutual TLS) or when --ca-cert, --client-cert/--client-key or
--server-name say so; these flags win over the config, and --plaintext turns TLS off::

    dialogctl --ca-cert ca.pem stats
    dialogctl --ca-cert ca.pem --client-cert me.pem --client-key me.key overrides list

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
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import jwt

from client import ClusterStats, DialogShardError, ShardOverride, ShardStats
from client.gen.dialog.v1 import admin_service_pb2 as admin_pb
from server.cli import archive, backup, hotspots, inbox, messages, migrate, moves, reshard, verify
from server.cli.output import (
    PROG,
    fail,
    format_fields,
    format_table,
    message_dict,
    print_json,
    rfc3339,
    source_name,
)
from server.cli.progress import Progress
from server.cli.session import (
    EXIT_INTERRUPTED,
    MAX_INT64,
    RPC_EXIT_BASE,
    CliError,
    Session,
    int64_arg,
    int_in,
    page_size_arg,
    shard_id_arg,
    stored_layout,
)
from server.config import DEFAULT_LISTEN
from server.routing import Layout, bucket_of, pair_hash
from server.routing.distribution import DistributionSummary

_DEFAULT_TIMEOUT = 10.0
_DEFAULT_TTL = 3600

_user_id = int_in(1, MAX_INT64, "user id")
_shard_count = int_in(1, 2**31 - 1, "shard count")
_ttl = int_in(1, 10 * 365 * 24 * 3600, "ttl")


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout must be a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"timeout must be a positive number of seconds, got {text!r}")
    return value


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
    resolution = session.admin().resolve_shard(a, b)
    if session.json:
        print_json(message_dict(resolution.to_proto()))
        return 0
    print(
        format_fields(
            [
                ("pair", f"{min(a, b)} {max(a, b)}"),
                ("shard", resolution.shard_id),
                ("source", source_name(resolution.source)),
                ("hash shard", resolution.hash_shard_id),
                ("bucket", resolution.bucket),
            ]
        )
    )
    return 0


def _shard_of_offline(session: Session, a: int, b: int) -> int:
    args = session.args
    for value in (a, b):
        if not 1 <= value <= MAX_INT64:
            args.subparser.error(f"user ids must be in 1..{MAX_INT64}, got {value}")
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
        format_fields(
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


def _override_rows(overrides: Sequence[ShardOverride]) -> list[list[object]]:
    return [
        [
            o.user_id_1,
            o.user_id_2,
            o.shard_id,
            rfc3339(o.create_time),
            "rebalancer" if o.automatic else "operator",
        ]
        for o in overrides
    ]


_OVERRIDE_HEADERS = ("USER_ID_1", "USER_ID_2", "SHARD", "CREATED", "BY")


def cmd_overrides_list(session: Session) -> int:
    args = session.args
    admin = session.admin()
    overrides: list[ShardOverride]
    if args.all:
        overrides = list(admin.iter_overrides(page_size=args.page_size, page_token=args.page_token))
        token = ""
    else:
        page = admin.list_overrides(page_size=args.page_size, page_token=args.page_token)
        overrides, token = list(page.overrides), page.next_page_token
    if session.json:
        response = admin_pb.ListShardOverridesResponse(
            overrides=[o.to_proto() for o in overrides], next_page_token=token
        )
        print_json(message_dict(response))
        return 0
    if overrides:
        print(format_table(_OVERRIDE_HEADERS, _override_rows(overrides), right=(0, 1, 2)))
    print(f"{len(overrides)} override{'' if len(overrides) == 1 else 's'}")
    if token:
        print(f"more: dialogctl overrides list --page-token {token}   (or --all)")
    return 0


def cmd_overrides_set(session: Session) -> int:
    args = session.args
    override = session.admin().set_override(args.user_id_1, args.user_id_2, args.shard)
    if session.json:
        print_json(message_dict(admin_pb.SetShardOverrideResponse(override=override.to_proto())))
        return 0
    print(format_table(_OVERRIDE_HEADERS, _override_rows([override]), right=(0, 1, 2)))
    return 0


def cmd_overrides_delete(session: Session) -> int:
    args = session.args
    hash_shard = session.admin().delete_override(
        args.user_id_1, args.user_id_2, allow_missing=args.allow_missing
    )
    if session.json:
        print_json(message_dict(admin_pb.DeleteShardOverrideResponse(shard_id=hash_shard)))
        return 0
    low, high = sorted((args.user_id_1, args.user_id_2))
    print(f"pair {low} {high} has no override; it lives on its hash shard {hash_shard}")
    return 0


def _exact_stats(session: Session) -> ClusterStats:
    """Every shard counted exactly, one shard per call so that progress shows between them."""
    admin = session.admin()
    stats = admin.get_stats()
    counted: list[ShardStats] = []
    with Progress("counting") as progress:
        for shard in stats.shards:
            progress.update(f"shard {shard.shard_id} of {len(stats.shards)} (about {shard.message_count:,})")
            (exact,) = admin.get_stats(exact=True, shard_id=shard.shard_id).shards
            counted.append(exact)
    total = sum(s.message_count for s in counted if s.available)
    return dataclasses.replace(stats, shards=tuple(counted), total_message_count=total)


def cmd_stats(session: Session) -> int:
    stats = _exact_stats(session) if session.args.exact else session.admin().get_stats()
    available = [s for s in stats.shards if s.available]
    summary = DistributionSummary.summarize([s.message_count for s in available]) if available else None
    if session.json:
        document = message_dict(stats.to_proto())
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
        for s in stats.shards
    ]
    print(
        format_table(
            ("SHARD", "TABLE", "LOCATION", "MESSAGES", "OVERRIDES", "AVAILABLE"), rows, right=(0, 3, 4)
        )
    )
    print()
    fields: list[tuple[str, object]] = [
        ("shards", f"{stats.num_shards} ({len(available)} available)"),
        ("overrides", stats.override_count),
        ("messages total", stats.total_message_count),
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
        if len(available) < stats.num_shards:
            fields.append(("note", "figures cover the available shards only"))
    print(format_fields(fields))
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
    tls = parser.add_argument_group(
        "transport security",
        "TLS when the config has a [tls] section or one of --ca-cert, --client-cert, --server-name "
        "is given; these flags win over the config's server_ca_file, client_cert_file and "
        "client_key_file",
    )
    tls.add_argument(
        "--ca-cert",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="CA certificates that sign the server's certificate (default: [tls] server_ca_file, "
        "else the system's roots)",
    )
    tls.add_argument(
        "--client-cert",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="client certificate chain for mutual TLS, with --client-key (default: [tls] client_cert_file)",
    )
    tls.add_argument(
        "--client-key",
        type=Path,
        metavar="PEM",
        default=default(None),
        help="private key of --client-cert (default: [tls] client_key_file)",
    )
    tls.add_argument(
        "--server-name",
        metavar="NAME",
        default=default(None),
        help="name the server's certificate must carry, when not the host of the address",
    )
    tls.add_argument(
        "--plaintext",
        action="store_true",
        default=default(False),
        help="connect without TLS even when the config has a [tls] section",
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

    stats = command(
        commands, "stats", cmd_stats, "messages and overrides per shard, and how evenly they spread"
    )
    stats.add_argument(
        "--exact",
        action="store_true",
        help="count every shard's messages (a scan per shard) instead of PostgreSQL's estimate",
    )

    for extension in (messages, migrate, backup, verify, reshard, hotspots, moves, inbox, archive):
        extension.register(commands, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    session = Session(args)
    try:
        code: int = args.func(session)
        sys.stdout.flush()
        return code
    except CliError as exc:
        return fail(exc.message, exc.exit_code)
    except DialogShardError as exc:  # an RPC failed: the client's error, exit status as grpcurl's
        message = f"{exc.code.name}: {exc.message}"
        if exc.code == grpc.StatusCode.UNAVAILABLE and session.connection is not None:
            # Often the transport is the cause (plaintext to a TLS port, no client certificate for
            # mutual TLS), and gRPC's message does not say which one was tried.
            message += f" (calling {session.connection})"
        return fail(message, RPC_EXIT_BASE + exc.code.value[0])
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
