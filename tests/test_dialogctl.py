"""The real `dialogctl` console script, run as a subprocess against the session's real server.

The session server runs on this process's event loop, so every subprocess is awaited
(asyncio.create_subprocess_exec): a blocking subprocess.run would stall the server it calls.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from client.gen.dialog.v1 import dialog_service_pb2 as pb
from client.gen.dialog.v1 import dialog_service_pb2_grpc
from server.config import ServerConfig
from server.routing import bucket_of, calculate_shard
from tests.pgfixtures import free_port
from tests.processes import child_env, write_server_config
from tests.support import DIALOGCTL, Metadata, rows_for_pair, run_dialogctl

RPC_EXIT_BASE = 64


async def test_user_token_is_accepted_by_the_server(
    ctl: Callable[..., Any],
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    result = await ctl("token", "--user", str(a))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n", "only the token goes to stdout"
    assert token.count(".") == 2

    sent = await dialog_stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="via dialogctl token"),
        metadata=(("authorization", f"Bearer {token}"),),
    )
    assert sent.message.from_user_id == a
    assert sent.message.text == "via dialogctl token"

    # The token names user a only: acting as b with it is refused.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dialog_stub.SendMessage(
            pb.SendMessageRequest(from_user_id=b, to_user_id=a, text="not mine"),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_token_json_and_ttl(ctl: Callable[..., Any]) -> None:
    result = await ctl("token", "--user", "42", "--ttl", "120", "--json")
    doc = result.json()
    claims = doc["claims"]
    assert claims["sub"] == "42"
    assert claims["exp"] - claims["iat"] == 120
    assert "admin" not in claims

    admin = (await ctl("--json", "token", "--admin")).json()
    assert admin["claims"]["admin"] is True
    assert "sub" not in admin["claims"]

    # A token the server would refuse for living too long is not minted.
    for who, ttl, limit in ((("--admin",), "3601", "3600"), (("--user", "42"), "86401", "86400")):
        refused = await ctl("token", *who, "--ttl", ttl)
        assert refused.returncode != 0 and not refused.stdout
        assert f"living at most {limit} s" in refused.stderr


async def test_token_signed_with_another_key_is_rejected(
    tmp_path: Path,
    cluster_config: ServerConfig,
    address: str,
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    # A config with another key mints tokens the session server must refuse.
    other = write_server_config(tmp_path / "other.toml", cluster_config, address, "x" * 48)
    a, b = new_pair()
    result = await run_dialogctl("--config", str(other), "token", "--user", str(a))
    assert result.returncode == 0, result.stderr
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dialog_stub.SendMessage(
            pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="forged"),
            metadata=(("authorization", f"Bearer {result.stdout.strip()}"),),
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # ... and an admin call signed with that key fails with UNAUTHENTICATED (64 + 16).
    stats = await run_dialogctl("--config", str(other), "stats")
    assert stats.returncode == RPC_EXIT_BASE + grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert stats.stderr.startswith("dialogctl: UNAUTHENTICATED: ")
    assert stats.stdout == ""


async def test_shard_of_agrees_with_calculate_shard_online_and_offline(
    ctl: Callable[..., Any], new_pair: Callable[[], tuple[int, int]]
) -> None:
    pairs = [new_pair() for _ in range(4)] + [(1, 2), (2, 1), (2**63 - 1, 1)]
    # Independent subprocesses: run them side by side.
    online = await asyncio.gather(*(ctl("shard-of", str(a), str(b), "--json") for a, b in pairs))
    offline = await asyncio.gather(
        *(ctl("--json", "shard-of", "--offline", "--shards", "4", str(a), str(b)) for a, b in pairs)
    )
    for (a, b), online_result, offline_result in zip(pairs, online, offline, strict=True):
        expected = calculate_shard(a, b, 4)
        assert online_result.json() == {
            "shard_id": expected,
            "source": "SHARD_SOURCE_HASH",
            "hash_shard_id": expected,
            "bucket": bucket_of(a, b),
        }
        offline_doc = offline_result.json()
        assert offline_doc["shard_id"] == offline_doc["hash_shard_id"] == expected
        assert offline_doc["bucket"] == bucket_of(a, b)
        assert offline_doc["offline"] is True

    # Other shard counts offline, without any config or server.
    a, b = pairs[0]
    counts = (1, 3, 16)
    other = await asyncio.gather(
        *(
            run_dialogctl("--json", "shard-of", "--offline", "--shards", str(n), str(a), str(b))
            for n in counts
        )
    )
    assert [r.json()["shard_id"] for r in other] == [calculate_shard(a, b, n) for n in counts]

    # --offline without --shards takes the count from the config; human output names the shard.
    a, b = pairs[1]
    human = await ctl("shard-of", "--offline", str(a), str(b))
    assert human.returncode == 0, human.stderr
    fields = dict(line.split(None, 1) for line in human.stdout.splitlines() if not line.startswith("hash"))
    assert fields["shard"] == str(calculate_shard(a, b, 4))
    assert fields["shards"] == "4"
    online_human = await ctl("shard-of", str(b), str(a))
    assert f"shard       {calculate_shard(a, b, 4)}\n" in online_human.stdout
    assert "source      hash\n" in online_human.stdout


async def test_overrides_set_list_delete_round_trip(
    ctl: Callable[..., Any], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    low, high = sorted((a, b))
    hash_shard = calculate_shard(a, b, 4)
    target = (hash_shard + 1) % 4

    created = (await ctl("overrides", "set", str(b), str(a), str(target), "--json")).json()["override"]
    assert (created["user_id_1"], created["user_id_2"]) == (str(low), str(high))
    assert created["shard_id"] == target
    assert created["create_time"].endswith("Z")

    resolved = (await ctl("--json", "shard-of", str(a), str(b))).json()
    assert resolved["shard_id"] == target
    assert resolved["source"] == "SHARD_SOURCE_OVERRIDE"
    assert resolved["hash_shard_id"] == hash_shard

    def mine(listing: dict[str, Any]) -> list[dict[str, Any]]:
        return [o for o in listing["overrides"] if (o["user_id_1"], o["user_id_2"]) == (str(low), str(high))]

    listed = (await ctl("overrides", "list", "--all", "--json")).json()
    assert [o["shard_id"] for o in mine(listed)] == [target]
    assert listed["next_page_token"] == ""
    # Paging by 1 with --all walks every page and sees the same overrides in the same order.
    paged = (await ctl("overrides", "list", "--all", "--page-size", "1", "--json")).json()
    assert paged["overrides"] == listed["overrides"]
    pairs = [(int(o["user_id_1"]), int(o["user_id_2"])) for o in paged["overrides"]]
    assert pairs == sorted(pairs)

    # Without --all, one page and a token to continue.
    first = (await ctl("overrides", "list", "--page-size", "1", "--json")).json()
    assert len(first["overrides"]) == 1
    assert first["next_page_token"] or len(listed["overrides"]) == 1
    human = await ctl("overrides", "list", "--all")
    assert human.returncode == 0, human.stderr
    assert human.stdout.splitlines()[0].split() == ["USER_ID_1", "USER_ID_2", "SHARD", "CREATED", "BY"]
    assert any(line.split()[:3] == [str(low), str(high), str(target)] for line in human.stdout.splitlines())

    deleted = (await ctl("overrides", "delete", str(a), str(b), "--json")).json()
    assert deleted == {"shard_id": hash_shard}
    after = (await ctl("overrides", "list", "--all", "--json")).json()
    assert mine(after) == []
    assert (await ctl("--json", "shard-of", str(a), str(b))).json()["source"] == "SHARD_SOURCE_HASH"

    missing = await ctl("overrides", "delete", str(a), str(b))
    assert missing.returncode == RPC_EXIT_BASE + grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.stderr.startswith("dialogctl: NOT_FOUND: ")
    allowed = await ctl("overrides", "delete", str(a), str(b), "--allow-missing")
    assert allowed.returncode == 0, allowed.stderr
    assert f"hash shard {hash_shard}" in allowed.stdout


async def test_stats_counts_follow_the_messages_sent(
    ctl: Callable[..., Any],
    dialog_stub: dialog_service_pb2_grpc.DialogServiceAsyncStub,
    auth_for: Callable[..., Metadata],
    new_pair: Callable[[], tuple[int, int]],
    cluster_config: ServerConfig,
) -> None:
    # Two pairs on two different shards, with different message counts.
    first = new_pair()
    second = new_pair()
    while calculate_shard(*second, 4) == calculate_shard(*first, 4):
        second = new_pair()
    plan = {first: 3, second: 5}

    before = (await ctl("stats", "--exact", "--json")).json()
    for (a, b), count in plan.items():
        for i in range(count):
            await dialog_stub.SendMessage(
                pb.SendMessageRequest(from_user_id=a, to_user_id=b, text=f"stats {i}"), metadata=auth_for(a)
            )
    after = (await ctl("--json", "stats", "--exact")).json()

    for doc in (before, after):
        assert doc["num_shards"] == 4
        assert [s["shard_id"] for s in doc["shards"]] == [0, 1, 2, 3]
        assert all(s["available"] and s["message_count_exact"] for s in doc["shards"])
        counts = [int(s["message_count"]) for s in doc["shards"]]
        assert int(doc["total_message_count"]) == sum(counts)
        assert doc["distribution"]["total"] == sum(counts)
        assert doc["distribution"]["shards"] == 4
        assert 0.0 <= doc["distribution"]["p_value"] <= 1.0
        assert [s["table_name"] for s in doc["shards"]] == [s.table for s in cluster_config.shards]

    expected_delta = [0, 0, 0, 0]
    for pair, count in plan.items():
        shard = calculate_shard(*pair, 4)
        assert list(rows_for_pair(cluster_config, pair)) == [shard]  # stored where the hash says
        expected_delta[shard] += count
    delta = [
        int(x["message_count"]) - int(y["message_count"])
        for x, y in zip(after["shards"], before["shards"], strict=True)
    ]
    # Tests run one at a time and the server serves only this process: nothing else writes meanwhile.
    assert delta == expected_delta

    human = await ctl("stats", "--exact")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["SHARD", "TABLE", "LOCATION", "MESSAGES", "OVERRIDES", "AVAILABLE"]
    for configured in cluster_config.shards:
        row = lines[1 + configured.shard_id].split()
        assert row[:3] == [str(configured.shard_id), configured.table, configured.location]
        assert int(row[3]) >= int(after["shards"][configured.shard_id]["message_count"])
    assert any(line.startswith("p-value") for line in lines)
    assert any(line.startswith("coeff. of variation") for line in lines)


async def test_failed_rpc_exits_64_plus_code_without_traceback(
    ctl: Callable[..., Any], new_pair: Callable[[], tuple[int, int]]
) -> None:
    a, b = new_pair()
    result = await ctl("overrides", "set", str(a), str(b), "99")
    assert result.returncode == RPC_EXIT_BASE + grpc.StatusCode.INVALID_ARGUMENT.value[0] == 67
    assert result.stderr.startswith("dialogctl: INVALID_ARGUMENT: ")
    assert "shard_id" in result.stderr
    assert result.stdout == ""

    bad_page = await ctl("overrides", "list", "--page-size", "-1", "--json")
    assert bad_page.returncode == 67
    assert "page_size" in bad_page.stderr


async def test_unreachable_server_is_unavailable(ctl: Callable[..., Any]) -> None:
    result = await ctl("--address", f"127.0.0.1:{free_port()}", "--timeout", "5", "stats")
    assert result.returncode == RPC_EXIT_BASE + grpc.StatusCode.UNAVAILABLE.value[0] == 78
    assert result.stderr.startswith("dialogctl: UNAVAILABLE: ")


async def test_config_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    missing = await run_dialogctl("--config", str(tmp_path / "nope.toml"), "token", "--user", "1")
    assert missing.returncode == 2
    assert missing.stderr.startswith("dialogctl: ") and "does not exist" in missing.stderr

    broken = tmp_path / "broken.toml"
    broken.write_text("listen = [unclosed\n")
    invalid = await run_dialogctl("--config", str(broken), "stats")
    assert invalid.returncode == 2
    assert "not valid TOML" in invalid.stderr

    # No --config, no $DIALOG_CONFIG and no .data/dialog-shard.toml under the working directory.
    nothing = await run_dialogctl("token", "--user", "1", cwd=tmp_path)
    assert nothing.returncode == 2
    assert "no config file" in nothing.stderr


async def test_default_config_is_found(
    tmp_path: Path,
    cluster_config: ServerConfig,
    address: str,
    jwt_secret: str,
    new_pair: Callable[[], tuple[int, int]],
) -> None:
    a, b = new_pair()
    expected = calculate_shard(a, b, 4)
    # The file `dialog-server --dev` writes, relative to the working directory...
    write_server_config(tmp_path / "dev" / ".data" / "dialog-shard.toml", cluster_config, address, jwt_secret)
    found = await run_dialogctl("--json", "shard-of", str(a), str(b), cwd=tmp_path / "dev")
    assert found.json()["shard_id"] == expected
    # ... and $DIALOG_CONFIG, which wins over it.
    elsewhere = write_server_config(tmp_path / "elsewhere.toml", cluster_config, address, jwt_secret)
    env = child_env(DIALOG_CONFIG=str(elsewhere))
    via_env = await run_dialogctl("shard-of", "--json", str(a), str(b), cwd=tmp_path, env=env)
    assert via_env.json()["shard_id"] == expected


async def test_usage_errors(ctl: Callable[..., Any]) -> None:
    neither = await ctl("token")
    assert neither.returncode == 2
    assert "--user" in neither.stderr
    same = await run_dialogctl("shard-of", "--offline", "--shards", "4", "7", "7")
    assert same.returncode == 2
    assert "differ" in same.stderr
    out_of_range = await run_dialogctl("shard-of", "--offline", "--shards", "4", "1", str(2**63))
    assert out_of_range.returncode == 2


def test_dialogctl_script_is_installed() -> None:
    assert DIALOGCTL.is_file() and os.access(DIALOGCTL, os.X_OK)


async def test_token_used_for_get_dialog(
    ctl: Callable[..., Any], channel: grpc.aio.Channel, new_pair: Callable[[], tuple[int, int]]
) -> None:
    """Tokens for both users of a pair let each read the dialog the other wrote to."""
    stub = dialog_service_pb2_grpc.DialogServiceStub(channel)
    a, b = new_pair()
    token_a = (await ctl("token", "--user", str(a))).stdout.strip()
    token_b = (await ctl("token", "--user", str(b))).stdout.strip()
    sent = await stub.SendMessage(
        pb.SendMessageRequest(from_user_id=a, to_user_id=b, text="ping"),
        metadata=(("authorization", f"Bearer {token_a}"),),
    )
    page = await stub.GetDialog(
        pb.GetDialogRequest(user_id=b, peer_user_id=a), metadata=(("authorization", f"Bearer {token_b}"),)
    )
    assert [m.message_id for m in page.messages] == [sent.message.message_id]
