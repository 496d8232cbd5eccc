"""Hostile input against the running session server: generated requests and raw bytes.

Whatever arrives, the server answers with a deliberate status (never INTERNAL or
UNKNOWN), stores accepted texts exactly as sent and stores nothing for refused
requests. The session server runs on the test event loop, so the generated
cases run in a worker thread with a blocking channel.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
import jwt
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.auth import issue_token
from server.config import ServerConfig
from server.dev.embedded_pg import EmbeddedPostgres
from server.runtime.app import running_server
from tests.support import Metadata, expect_error, make_config, rows_for_pair, status_details

MAX_ID = 2**63 - 1
SEND_METHOD = "/dialog.v1.DialogService/SendMessage"

#: Every status a hostile request may legitimately get; INTERNAL and UNKNOWN are bugs.
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


#: What a server with tight limits may answer besides: a rate limit or the concurrency cap.
UNDER_LIMITS = DELIBERATE | {grpc.StatusCode.RESOURCE_EXHAUSTED}


def deliberate_outcome(
    call: Callable[[], object], allowed: frozenset[grpc.StatusCode] | set[grpc.StatusCode] = DELIBERATE
) -> grpc.StatusCode:
    """The status of one call, failing the test unless it is one of `allowed`."""
    try:
        call()
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        assert code in allowed, (code, err.details())
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            details = err.details() or ""
            assert "too many" in details or "concurrent" in details.lower(), details
        return code
    return grpc.StatusCode.OK


SQL_INJECTIONS = [
    "'; DROP TABLE messages_0; --",
    "' OR '1'='1",
    "1; DELETE FROM shard_map WHERE true; --",
    "\\'; SELECT pg_sleep(10); --",
    "$$; TRUNCATE messages_1; $$",
    "%s %s %(x)s {0} {}",
    "Robert'); DROP TABLE Students;--",
    "E'\\x00'",
]
ODD_CHARACTERS = [
    "\u202e",  # right-to-left override
    "\u200f",  # right-to-left mark
    "\u200b",  # zero-width space
    "\u200d",  # zero-width joiner
    "\ufeff",  # byte order mark
    "\u0301",  # combining acute accent
    "\U0001f600",  # emoji (astral)
    "\U0001f469\u200d\U0001f4bb",  # emoji ZWJ sequence
    "\U0010ffff",  # highest code point
    "\U0001d11e",  # musical symbol (4 UTF-8 bytes)
    "\x00",  # NUL: PostgreSQL cannot store it, so it is refused
    "\x7f",
    "\r\n",
    "\t",
    " ",
    "\u00a0",  # no-break space
    "\u3000",  # ideographic space
    "ש",
    "م",
    "'",
    '"',
    "\\",
    ";",
    "%",
]

texts = st.one_of(
    st.text(max_size=200),
    st.sampled_from(SQL_INJECTIONS),
    st.lists(st.sampled_from(ODD_CHARACTERS), max_size=60).map("".join),
    st.lists(st.sampled_from(SQL_INJECTIONS + ODD_CHARACTERS + ["hello"]), max_size=8).map("".join),
    # Around the limits: 4096 characters / 16384 bytes.
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\U0001f600", " "]), st.integers(4090, 4100)),
)
request_ids = st.one_of(
    st.just(""),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=130),
    st.text(max_size=20),
)
# How the recipient id is chosen: a fresh valid id, the largest id, the sender itself, or an invalid one.
recipients = st.one_of(
    st.just("fresh"),
    st.just("max"),
    st.just("self"),
    st.integers(min_value=-(2**63), max_value=0),
)


def fresh_id(rng: random.Random) -> int:
    return rng.randrange(1, MAX_ID)


# `make test` runs a quarter of the examples; all of them are slow (`pytest -m slow`).
@pytest.mark.parametrize("examples", [300, pytest.param(1200, marks=pytest.mark.slow)])
async def test_generated_send_message_requests(
    address: str, cluster_config: ServerConfig, examples: int
) -> None:
    started = time.monotonic()
    counts = await asyncio.to_thread(fuzz_send_message, address, cluster_config, examples)
    elapsed = time.monotonic() - started
    print(f"\n[fuzz] SendMessage: {counts} in {elapsed:.1f}s")
    # Both outcomes were exercised, so neither half of the property was vacuous.
    assert counts["accepted"] > examples // 12 and counts["refused"] > examples // 12, counts


def fuzz_send_message(address: str, config: ServerConfig, examples: int) -> dict[str, int]:
    rng = random.Random()
    counts = {"accepted": 0, "refused": 0}
    with grpc.insecure_channel(address) as channel:
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(text=texts, request_id=request_ids, recipient=recipients, high_sender=st.booleans())
        def check(text: str, request_id: str, recipient: Any, high_sender: bool) -> None:
            sender = rng.randrange(2**62, MAX_ID) if high_sender else fresh_id(rng)
            to = {"fresh": fresh_id(rng), "max": MAX_ID, "self": sender}.get(recipient, recipient)
            request = pb.SendMessageRequest(
                from_user_id=sender, to_user_id=to, text=text, request_id=request_id
            )
            metadata = (("authorization", f"Bearer {issue_token(config.auth, user_id=sender)}"),)
            try:
                reply = stub.SendMessage(request, metadata=metadata, timeout=10)
            except grpc.RpcError as err:
                code = err.code()
                assert code in DELIBERATE, (code, err.details())
                counts["refused"] += 1
                if 1 <= to <= MAX_ID:
                    assert rows_for_pair(config, (sender, to)) == {}, (text, request_id)
                return
            counts["accepted"] += 1
            assert reply.message.text == text
            (rows,) = rows_for_pair(config, (sender, to)).values()
            assert [(r[1], r[2], r[3], r[4]) for r in rows] == [(sender, to, text, request_id or None)]

        check()
    return counts


async def test_generated_get_dialog_requests(address: str, cluster_config: ServerConfig) -> None:
    # Generated requests repeat users (the shrinker's favourite is 1): the per-user read limit may
    # refuse some, with RESOURCE_EXHAUSTED (checked to be the rate limit), never INTERNAL.
    counts = await asyncio.to_thread(fuzz_get_dialog, address, cluster_config, UNDER_LIMITS)
    print(f"\n[fuzz] GetDialog: {counts}")
    assert all(counts.get(code.name, 0) > 20 for code in DELIBERATE - {grpc.StatusCode.UNAUTHENTICATED}), (
        counts
    )


def fuzz_get_dialog(
    address: str, config: ServerConfig, allowed: set[grpc.StatusCode] = DELIBERATE
) -> dict[str, int]:
    counts: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)

        @settings(
            max_examples=800, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
        )
        @given(
            user=st.one_of(st.integers(1, MAX_ID), st.integers(-(2**63), 0)),
            peer=st.one_of(st.integers(1, MAX_ID), st.integers(-(2**63), MAX_ID)),
            page_size=st.one_of(st.integers(0, 2000), st.integers(-(2**31), 2**31 - 1)),
            page_token=st.one_of(
                st.just(""),
                st.just(""),
                st.text(max_size=80),
                st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode()),
            ),
            order=st.one_of(st.sampled_from(pb.MessageOrder.values()), st.integers(-5, 5)),
            caller_choice=st.integers(0, 4),
        )
        def check(
            user: int, peer: int, page_size: int, page_token: str, order: int, caller_choice: int
        ) -> None:
            # Mostly the user itself; sometimes someone else, who must be refused.
            caller = 12345 if caller_choice == 0 or user < 1 else user
            request = pb.GetDialogRequest(
                user_id=user,
                peer_user_id=peer,
                page_size=page_size,
                page_token=page_token,
                # Any int, valid or not: the server must refuse the unknown ones cleanly.
                order=cast("pb.MessageOrder.ValueType", order),
            )
            metadata = (("authorization", f"Bearer {issue_token(config.auth, user_id=caller)}"),)
            code = deliberate_outcome(lambda: stub.GetDialog(request, metadata=metadata, timeout=10), allowed)
            counts[code.name] = counts.get(code.name, 0) + 1

        check()
    return counts


async def test_generated_subs_act_only_as_their_canonical_user(
    address: str, cluster_config: ServerConfig
) -> None:
    counts = await asyncio.to_thread(fuzz_subs, address, cluster_config)
    print(f"\n[fuzz] sub: {counts}")
    assert counts["accepted"] > 20 and counts["refused"] > 100, counts


def canonical_user(sub: object) -> int | None:
    """The user a sub names if it is spelled canonically (an oracle written apart from the server's)."""
    if not isinstance(sub, str) or not (sub.isascii() and sub.isdigit()):
        return None
    value = int(sub)
    return value if str(value) == sub and 1 <= value <= MAX_ID else None


def lenient_user(sub: object) -> int:
    """The user a careless parser (`int(sub)`) would read from a sub, else 7."""
    try:
        value = int(cast("Any", sub))
    except (TypeError, ValueError, OverflowError):
        return 7
    return value if 1 <= value <= MAX_ID else 7


def fuzz_subs(address: str, config: ServerConfig) -> dict[str, int]:
    secret = config.auth.jwt_secret
    assert secret is not None
    counts = {"accepted": 0, "refused": 0}
    digitish = st.sampled_from([*"0123456789", "+", "-", "_", " ", "\n", ".", "e", "\u0667", "\uff17"])
    with grpc.insecure_channel(address) as channel:
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)

        @settings(
            max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
        )
        @given(
            sub=st.one_of(
                st.integers(1, MAX_ID).map(str),
                st.integers(-(2**65), 2**65).map(str),
                st.integers(0, 10**6).map(lambda n: f"0{n}"),
                st.text(digitish, max_size=22),
                st.text(max_size=12),
                st.integers(-(2**65), 2**65),
                st.floats(allow_nan=False, allow_infinity=False),
                st.booleans(),
            )
        )
        def check(sub: object) -> None:
            now = int(time.time())
            token = jwt.encode({"sub": sub, "iat": now, "exp": now + 60}, secret, algorithm="HS256")
            user = canonical_user(sub) or lenient_user(sub)
            request = pb.GetDialogRequest(user_id=user, peer_user_id=user % MAX_ID + 1, page_size=1)
            metadata = (("authorization", f"Bearer {token}"),)
            code = deliberate_outcome(lambda: stub.GetDialog(request, metadata=metadata, timeout=10))
            if canonical_user(sub) is None:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (sub, code)
                counts["refused"] += 1
            else:
                assert code == grpc.StatusCode.OK, (sub, code)
                counts["accepted"] += 1

        check()
    return counts


@pytest_asyncio.fixture(scope="module")
async def tight_server(
    pg_servers: list[EmbeddedPostgres], jwt_secret: str
) -> AsyncIterator[tuple[str, ServerConfig]]:
    """A server with the smallest page budget, a low read rate and few concurrent calls; sends unlimited."""
    config = make_config(
        [s.dsn for s in pg_servers],
        jwt_secret,
        limits={
            "send_rate_per_second": 0,
            "read_rate_per_second": 20,
            "read_burst": 20,
            "max_response_bytes": 16384 + 1024,
            "max_concurrent_rpcs": 4,
        },
    )
    async with running_server(config) as running:
        yield f"127.0.0.1:{running.port}", config


async def test_generated_get_dialog_requests_under_tight_limits(
    tight_server: tuple[str, ServerConfig],
) -> None:
    counts = await asyncio.to_thread(fuzz_get_dialog, *tight_server, UNDER_LIMITS)
    print(f"\n[fuzz] GetDialog under tight limits: {counts}")
    # The one caller reading others' dialogs (12345) runs into the read limit.
    assert counts.get("RESOURCE_EXHAUSTED", 0) > 5 and counts.get("OK", 0) > 20, counts


async def test_generated_dialogs_page_within_the_budget_exactly_once(
    tight_server: tuple[str, ServerConfig],
) -> None:
    pages = await asyncio.to_thread(fuzz_paging, *tight_server)
    assert pages > 80, "some dialogs took several pages"


def fuzz_paging(address: str, config: ServerConfig) -> int:
    """Dialogs of generated texts (up to the size limits) walked at generated page sizes, both orders."""
    rng = random.Random()
    budget = config.limits.max_response_bytes
    walked = 0
    with grpc.insecure_channel(address) as channel:
        stub = dialog_service_pb2_grpc.DialogServiceStub(channel)

        @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(
            dialog=st.lists(texts, min_size=1, max_size=6),
            page_size=st.integers(0, 5),
            order=st.sampled_from(pb.MessageOrder.values()),
        )
        def check(dialog: list[str], page_size: int, order: int) -> None:
            nonlocal walked
            a, b = fresh_id(rng), fresh_id(rng)
            metadata = (("authorization", f"Bearer {issue_token(config.auth, user_id=a)}"),)
            stored: list[str] = []
            for text in dialog:
                send = pb.SendMessageRequest(from_user_id=a, to_user_id=b, text=text)
                try:
                    stored.append(stub.SendMessage(send, metadata=metadata, timeout=10).message.message_id)
                except grpc.RpcError as err:
                    assert err.code() in DELIBERATE, (err.code(), err.details())
            seen: list[str] = []
            token = ""
            for _ in range(len(stored) + 1):
                request = pb.GetDialogRequest(
                    user_id=a,
                    peer_user_id=b,
                    page_size=page_size,
                    page_token=token,
                    order=cast("pb.MessageOrder.ValueType", order),
                )
                page = stub.GetDialog(request, metadata=metadata, timeout=10)
                walked += 1
                assert page.ByteSize() <= budget
                assert page.messages or not stored
                seen += [m.message_id for m in page.messages]
                token = page.next_page_token
                if not token:
                    break
            newest_first = order != pb.MESSAGE_ORDER_OLDEST_FIRST
            assert seen == sorted(stored, reverse=newest_first), "every message once, in order"

        check()
    return walked


def raw_send(channel: grpc.aio.Channel) -> Callable[..., Any]:
    """SendMessage with the request body given as bytes, as a hostile or buggy client may send it."""
    return channel.unary_unary(SEND_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(
    channel: grpc.aio.Channel,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    a, b = new_pair()
    body = pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="ab").SerializeToString()
    invalid = body.replace(b"ab", b"\xff\xfe")  # the same field, now holding bytes that are not UTF-8
    err = await expect_error(
        raw_send(channel)(invalid, metadata=auth_for(a)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "UTF-8" in (err.details() or "")
    info, _ = status_details(err)
    assert info is not None and info.reason == "MALFORMED_REQUEST"
    # The untouched body goes through the same path, so it is the bytes that were refused.
    await raw_send(channel)(body, metadata=auth_for(a))
    (rows,) = rows_for_pair(cluster_config, (a, b)).values()
    assert [r[3] for r in rows] == ["ab"]


async def test_random_bytes_as_a_request_never_break_the_server(
    address: str, cluster_config: ServerConfig
) -> None:
    counts = await asyncio.to_thread(fuzz_raw_bytes, address, cluster_config)
    assert counts.get(grpc.StatusCode.INVALID_ARGUMENT.name, 0) > 10, counts


def fuzz_raw_bytes(address: str, config: ServerConfig) -> dict[str, int]:
    counts: dict[str, int] = {}
    token = issue_token(config.auth, user_id=777)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            SEND_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )

        @settings(max_examples=300, deadline=None, database=None)
        @given(body=st.binary(max_size=300))
        def check(body: bytes) -> None:
            code = deliberate_outcome(
                lambda: call(body, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            )
            counts[code.name] = counts.get(code.name, 0) + 1

        check()
    return counts
