"""Run the deployed topology from local processes: N PostgreSQL servers, one shard each, and the service.

    .venv/bin/python scripts/local_cluster.py                 # 4 shards, data in .data/cluster/
    .venv/bin/python scripts/local_cluster.py --shards 2 --data-dir /tmp/c --pg-ports 6001,6002

It starts one `server.dev.embedded_pg.EmbeddedPostgres` per shard (data in DATA_DIR/shard-N, log in
DATA_DIR/shard-N.log), writes DATA_DIR/dialog-shard.toml with shard N on server N (control tables on
shard 0) and an HS256 key generated on first run into DATA_DIR/jwt-secret, then runs
`dialog-server --config DATA_DIR/dialog-shard.toml` in the foreground. Ctrl-C or SIGTERM stops the
server (it drains in-flight calls) and then every PostgreSQL server; the data stay for the next run.
Tokens: `DIALOG_CONFIG=DATA_DIR/dialog-shard.toml .venv/bin/dialogctl token --user 1`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

# Runnable as a plain script from a checkout: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import DEFAULT_LISTEN, render_config
from server.dev.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from server.dev.stack import ensure_secret

DEFAULT_DATA_DIR = Path(".data/cluster")
DEFAULT_SHARDS = 4
#: Shard N listens on DEFAULT_BASE_PORT + N (`make run` uses 54329).
DEFAULT_BASE_PORT = 54330
CONFIG_NAME = "dialog-shard.toml"
SECRET_NAME = "jwt-secret"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="local_cluster.py",
        description="N local PostgreSQL servers (one shard each) and dialog-server, in the foreground.",
    )
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS, help="number of shards / servers")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"where data live (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--base-port", type=int, default=DEFAULT_BASE_PORT, help="PostgreSQL port of shard 0; shard N: +N"
    )
    parser.add_argument(
        "--pg-ports", help="comma-separated PostgreSQL ports, one per shard (wins over --base-port)"
    )
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"address of the service (default {DEFAULT_LISTEN})"
    )
    parser.add_argument(
        "--no-fsync", action="store_true", help="run PostgreSQL without fsync (tests; unsafe on power loss)"
    )
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    if args.pg_ports:
        args.ports = [int(p) for p in args.pg_ports.split(",") if p.strip()]
        if len(args.ports) != args.shards:
            parser.error(f"--pg-ports lists {len(args.ports)} ports for {args.shards} shards")
    else:
        args.ports = [args.base_port + i for i in range(args.shards)]
    return args


def write_config(path: Path, dsns: list[str], listen: str) -> None:
    path.write_text(
        render_config(
            shard_dsns=dsns,
            listen=listen,
            auth={"jwt_secret_file": SECRET_NAME},
            comment="Written by scripts/local_cluster.py on every start: one shard per PostgreSQL server.",
        )
    )


def _server_command(config: Path) -> list[str]:
    script = Path(sys.executable).parent / "dialog-server"
    if script.exists():
        return [str(script), "--config", str(config)]
    found = shutil.which("dialog-server")
    if found:
        return [found, "--config", str(config)]
    return [sys.executable, "-m", "server", "--config", str(config)]


def _stop_all(servers: list[EmbeddedPostgres]) -> None:
    def stop(server: EmbeddedPostgres) -> None:
        try:
            server.stop("fast")
        except EmbeddedPostgresError as exc:
            print(f"local_cluster: stopping {server.data_dir} failed: {exc}", file=sys.stderr, flush=True)

    if servers:
        print(f"stopping {len(servers)} PostgreSQL servers", flush=True)
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            list(pool.map(stop, servers))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    ensure_secret(data_dir / SECRET_NAME)
    servers = [
        EmbeddedPostgres(
            data_dir / f"shard-{i}", port=port, fsync=not args.no_fsync, log_file=data_dir / f"shard-{i}.log"
        )
        for i, port in enumerate(args.ports)
    ]
    # SIGTERM behaves like Ctrl-C until the server runs: unwind and stop what was started.
    signal.signal(signal.SIGTERM, _interrupt)
    child: subprocess.Popen[bytes] | None = None
    try:
        print(f"starting {len(servers)} PostgreSQL servers under {data_dir}", flush=True)
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            futures = [pool.submit(server.start) for server in servers]
            errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
        for i, server in enumerate(servers):
            print(f"  shard {i}: {server.dsn}", flush=True)
        config = data_dir / CONFIG_NAME
        write_config(config, [s.dsn for s in servers], args.listen)
        print(f"config: {config}", flush=True)

        child = subprocess.Popen(_server_command(config))

        def forward(signum: int, frame: FrameType | None) -> None:
            assert child is not None
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        return child.wait()
    except KeyboardInterrupt:
        return 130
    except EmbeddedPostgresError as exc:
        print(f"local_cluster: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        _stop_all(servers)
        print(f"stopped; data kept in {data_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(_parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
