"""`dialogctl`'s RPC commands against a TLS-only and a mutual-TLS server, as real subprocesses.

The certificates come from throwaway CAs (trustme); dialogctl finds them in its config's [tls]
section (server_ca_file, client_cert_file, client_key_file) or in the flags that win over it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import trustme

from server.config import ServerConfig, render_config
from server.dev.embedded_pg import EmbeddedPostgres
from server.routing import calculate_shard
from server.runtime.app import running_server
from tests.support import dialogctl, make_config

UNAVAILABLE_EXIT = 64 + grpc.StatusCode.UNAVAILABLE.value[0]

SERVER_CA = trustme.CA()
CLIENT_CA = trustme.CA()
SERVER_CERT = SERVER_CA.issue_cert("127.0.0.1", "localhost")
CLIENT_CERT = CLIENT_CA.issue_cert("dialogctl.dialog.test")

Pair = tuple[int, int]


def _chain(cert: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in cert.cert_chain_pems)


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's and dialogctl's certificates, keys and CAs, as PEM files."""
    directory = tmp_path_factory.mktemp("ctl-tls")
    (directory / "server.pem").write_bytes(_chain(SERVER_CERT))
    (directory / "server.key").write_bytes(SERVER_CERT.private_key_pem.bytes())
    (directory / "server-ca.pem").write_bytes(SERVER_CA.cert_pem.bytes())
    (directory / "clients-ca.pem").write_bytes(CLIENT_CA.cert_pem.bytes())
    (directory / "client.pem").write_bytes(_chain(CLIENT_CERT))
    (directory / "client.key").write_bytes(CLIENT_CERT.private_key_pem.bytes())
    return directory


def _server_tls(pems: Path, *, mutual: bool) -> dict[str, object]:
    tls: dict[str, object] = {"cert_file": str(pems / "server.pem"), "key_file": str(pems / "server.key")}
    if mutual:
        tls |= {"client_ca_file": str(pems / "clients-ca.pem"), "require_client_cert": True}
    return tls


async def _serve(config: ServerConfig) -> AsyncIterator[str]:
    async with running_server(config) as running:
        yield f"127.0.0.1:{running.port}"


@pytest_asyncio.fixture(scope="module")
async def tls_address(pg_servers: list[EmbeddedPostgres], jwt_secret: str, pems: Path) -> AsyncIterator[str]:
    """A server that speaks TLS only (no client certificates asked)."""
    config = make_config([s.dsn for s in pg_servers], jwt_secret, tls=_server_tls(pems, mutual=False))
    async for address in _serve(config):
        yield address


@pytest_asyncio.fixture(scope="module")
async def mtls_address(pg_servers: list[EmbeddedPostgres], jwt_secret: str, pems: Path) -> AsyncIterator[str]:
    """A server that refuses clients without a certificate of CLIENT_CA."""
    config = make_config([s.dsn for s in pg_servers], jwt_secret, tls=_server_tls(pems, mutual=True))
    async for address in _serve(config):
        yield address


CtlConfig = Callable[..., Path]


@pytest.fixture
def ctl_config(tmp_path: Path, cluster_config: ServerConfig, jwt_secret: str) -> CtlConfig:
    """`ctl_config(address, tls={...})`: a config file naming `address`, with that [tls] section (or none)."""

    def write(address: str, *, tls: dict[str, object] | None = None) -> Path:
        path = tmp_path / f"dialogctl-{len(list(tmp_path.iterdir()))}.toml"
        text = render_config(
            shard_dsns=[s.dsn for s in cluster_config.shards],
            control_dsn=cluster_config.control_dsn,
            listen=address,
            auth={"jwt_secret": jwt_secret},
            sections={"tls": tls} if tls is not None else None,
        )
        path.write_text(text)
        return path

    return write


def _client_tls(pems: Path, *, ca: bool = True, client_cert: bool = False) -> dict[str, object]:
    """A [tls] section as an operator's copy of the server's config has it, plus dialogctl's keys."""
    tls = _server_tls(pems, mutual=client_cert)
    if ca:
        tls["server_ca_file"] = str(pems / "server-ca.pem")
    if client_cert:
        tls |= {"client_cert_file": str(pems / "client.pem"), "client_key_file": str(pems / "client.key")}
    return tls


async def _exercise_rpc_commands(config: Path, pair: Pair, *flags: str) -> None:
    """Every RPC command of dialogctl, with real answers: set, resolve, list, stats, messages, delete."""
    a, b = pair
    low, high = sorted(pair)
    hash_shard = calculate_shard(a, b, 4)
    target = (hash_shard + 1) % 4

    created = (
        await dialogctl(config, *flags, "overrides", "set", str(a), str(b), str(target), "--json")
    ).json()
    assert created["override"]["shard_id"] == target
    assert (created["override"]["user_id_1"], created["override"]["user_id_2"]) == (str(low), str(high))

    resolved = (await dialogctl(config, *flags, "--json", "shard-of", str(a), str(b))).json()
    assert (resolved["shard_id"], resolved["source"]) == (target, "SHARD_SOURCE_OVERRIDE")

    listed = (
        await dialogctl(config, *flags, "overrides", "list", "--all", "--page-size", "1", "--json")
    ).json()
    assert [str(low), str(high), target] in [
        [o["user_id_1"], o["user_id_2"], o["shard_id"]] for o in listed["overrides"]
    ]

    stats = await dialogctl(config, *flags, "stats")
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout.splitlines()[0].split() == [
        "SHARD",
        "TABLE",
        "LOCATION",
        "MESSAGES",
        "OVERRIDES",
        "AVAILABLE",
    ]

    messages = (
        await dialogctl(config, *flags, "messages", "--pair", str(a), str(b), "--all", "--json")
    ).json()
    assert messages == {"messages": [], "next_page_token": ""}

    deleted = await dialogctl(config, *flags, "overrides", "delete", str(a), str(b))
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == f"pair {low} {high} has no override; it lives on its hash shard {hash_shard}\n"


async def test_rpc_commands_over_tls_from_the_config(
    tls_address: str, ctl_config: CtlConfig, pems: Path, new_pair: Callable[[], Pair]
) -> None:
    await _exercise_rpc_commands(ctl_config(tls_address, tls=_client_tls(pems)), new_pair())


async def test_rpc_commands_over_tls_from_the_flags(
    tls_address: str, ctl_config: CtlConfig, pems: Path, new_pair: Callable[[], Pair]
) -> None:
    # No [tls] section: --ca-cert alone asks for TLS; --server-name checks the certificate's other name.
    config = ctl_config(tls_address)
    flags = ("--ca-cert", str(pems / "server-ca.pem"), "--server-name", "localhost")
    await _exercise_rpc_commands(config, new_pair(), *flags)


async def test_rpc_commands_over_mutual_tls(
    mtls_address: str, ctl_config: CtlConfig, pems: Path, new_pair: Callable[[], Pair]
) -> None:
    # The client certificate from the config ...
    await _exercise_rpc_commands(
        ctl_config(mtls_address, tls=_client_tls(pems, client_cert=True)), new_pair()
    )
    # ... or from the flags, which win over a config that has none.
    flags = ("--client-cert", str(pems / "client.pem"), "--client-key", str(pems / "client.key"))
    await _exercise_rpc_commands(ctl_config(mtls_address, tls=_client_tls(pems)), new_pair(), *flags)


async def test_plaintext_against_a_tls_server_fails_clearly(
    tls_address: str, ctl_config: CtlConfig, pems: Path
) -> None:
    for config, flags in (
        (ctl_config(tls_address), ()),  # a config without [tls]
        (ctl_config(tls_address, tls=_client_tls(pems)), ("--plaintext",)),  # the flag wins over [tls]
    ):
        result = await dialogctl(config, *flags, "--timeout", "3", "stats")
        assert result.returncode == UNAVAILABLE_EXIT, result.stderr
        assert result.stderr.startswith("dialogctl: UNAVAILABLE: "), result.stderr
        assert "plaintext" in result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert result.stdout == ""


async def test_mutual_tls_server_refuses_dialogctl_without_a_client_certificate(
    mtls_address: str, ctl_config: CtlConfig, pems: Path
) -> None:
    result = await dialogctl(ctl_config(mtls_address, tls=_client_tls(pems)), "--timeout", "3", "stats")
    assert result.returncode == UNAVAILABLE_EXIT, result.stderr
    assert result.stderr.startswith("dialogctl: UNAVAILABLE: "), result.stderr
    assert "TLS without a client certificate" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


async def test_an_untrusted_server_certificate_is_refused(
    tls_address: str, ctl_config: CtlConfig, pems: Path
) -> None:
    # Without server_ca_file or --ca-cert, the system's roots do not know the throwaway CA.
    result = await dialogctl(
        ctl_config(tls_address, tls=_client_tls(pems, ca=False)), "--timeout", "3", "stats"
    )
    assert result.returncode == UNAVAILABLE_EXIT, result.stderr
    assert result.stderr.startswith("dialogctl: UNAVAILABLE: "), result.stderr


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--client-cert", "{pems}/client.pem"), "--client-cert and --client-key go together"),
        (("--client-key", "{pems}/client.key"), "--client-cert and --client-key go together"),
        (
            ("--plaintext", "--ca-cert", "{pems}/server-ca.pem"),
            "--plaintext cannot be combined with --ca-cert",
        ),
        (("--ca-cert", "{pems}/missing.pem"), "cannot read --ca-cert {pems}/missing.pem"),
        (("--ca-cert", "{pems}/server.key.txt"), "is not a PEM file"),
    ],
)
async def test_inconsistent_tls_input_is_one_line_exit_2(
    tls_address: str, ctl_config: CtlConfig, pems: Path, flags: tuple[str, ...], fragment: str
) -> None:
    (pems / "server.key.txt").write_text("not a certificate\n")
    config = ctl_config(tls_address)
    result = await dialogctl(config, *(f.format(pems=pems) for f in flags), "stats")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("dialogctl: "), result.stderr
    assert fragment.format(pems=pems) in result.stderr
    assert len(result.stderr.splitlines()) == 1


async def test_config_with_half_a_client_certificate_is_refused(
    tls_address: str, ctl_config: CtlConfig, pems: Path
) -> None:
    tls = _client_tls(pems) | {"client_cert_file": str(pems / "client.pem")}
    result = await dialogctl(ctl_config(tls_address, tls=tls), "stats")
    assert result.returncode == 2, result.stderr
    assert "[tls] client_cert_file and client_key_file go together" in result.stderr
