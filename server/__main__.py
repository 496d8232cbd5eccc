"""`dialog-server`: run the service in the foreground until SIGINT or SIGTERM.

With `--dev` it also starts (and afterwards stops) an embedded PostgreSQL in
the data directory and writes the config and dev key there: the `make run` path.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from server.config import DEFAULT_LISTEN, ConfigError, LogConfig, ServerConfig, load_config
from server.dev import stack as devstack
from server.dev.embedded_pg import EmbeddedPostgres
from server.errors import StartupError
from server.interceptors.shared_buckets import SharedLimitTables
from server.observability.logs import configure_logging
from server.runtime import affinity, eventloop, supervisor
from server.runtime.app import RATE_LIMITS, running_server

_DEV_BANNER = """\
Try it (in another terminal):
  export TOKEN=$(.venv/bin/dialogctl token --user 1)
  .venv/bin/grpcurl -plaintext -H "authorization: Bearer $TOKEN" \\
    -d '{"from_user_id": 1, "to_user_id": 2, "text": "hello"}' {address} dialog.v1.DialogService/SendMessage
  .venv/bin/grpcurl -plaintext -H "authorization: Bearer $TOKEN" \\
    -d '{"user_id": 1, "peer_user_id": 2}' {address} dialog.v1.DialogService/GetDialog
Stop with Ctrl-C; the data stays in {data_dir} for the next run."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dialog-server", description="Serve dialog.v1 over gRPC.")
    parser.add_argument("--config", type=Path, help="TOML config file (default: $DIALOG_CONFIG)")
    parser.add_argument("--listen", help="address to serve on, e.g. 127.0.0.1:50051 (overrides config)")
    parser.add_argument(
        "--dev", action="store_true", help="start an embedded PostgreSQL with 4 shard tables in --data-dir"
    )
    parser.add_argument("--data-dir", type=Path, help="data directory of --dev (default: ./.data)")
    parser.add_argument(
        "--pg-port", type=int, default=devstack.DEFAULT_PG_PORT, help="port of the embedded PostgreSQL"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port (default: the config's `workers`, else 1)",
    )
    parser.add_argument(
        "--pin-workers",
        action="store_true",
        default=None,
        help="pin worker i to the i-th CPU (default: the config's `pin_workers`); "
        "only where this is the machine's one server",
    )
    parser.add_argument(
        "--event-loop",
        choices=eventloop.CHOICES,
        default="auto",
        help="asyncio event loop: uvloop when installed (auto, the default), or force one",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (overrides config)")
    parser.add_argument(supervisor.WORKER_FLAG, type=int, dest="worker_of", help=argparse.SUPPRESS)
    parser.add_argument(supervisor.WORKER_INDEX_FLAG, type=int, dest="worker_index", help=argparse.SUPPRESS)
    parser.add_argument(
        supervisor.SHARED_LIMITS_FLAG, type=Path, dest="shared_limits", help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


async def _serve(
    config: ServerConfig,
    banner: str | None,
    log_level: str | None,
    worker_of: int | None = None,
    pinned_cpu: int | None = None,
    shared_limits: Path | None = None,
) -> None:
    configure_logging(replace(config.log, level=log_level.upper()) if log_level else config.log)
    if pinned_cpu is not None:
        logging.getLogger(__name__).info("pinned to CPU %d", pinned_cpu)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger(__name__).info("event loop: %s", eventloop.name())
    async with running_server(
        config, reuse_port=worker_of is not None, shared_limits=shared_limits
    ) as running:
        address = f"{config.listen.rsplit(':', 1)[0]}:{running.port}"
        metrics_line = None
        if running.metrics_port is not None and config.metrics.listen is not None:
            # Printed by every process: with port 0 (or several workers) it is how to find it.
            host = config.metrics.listen.rsplit(":", 1)[0]
            metrics_line = f"{supervisor.METRICS_LINE}http://{host}:{running.metrics_port}/metrics"
        if worker_of is not None:
            watchdog = loop.create_task(supervisor.watch_parent(worker_of, stop))
            if metrics_line:
                print(metrics_line, flush=True)
            print(f"{supervisor.READY_LINE} on {address}", flush=True)
            await stop.wait()
            watchdog.cancel()
            return
        print(f"dialog-shard serving on {address} with {config.num_shards} shards", flush=True)
        if metrics_line:
            print(metrics_line, flush=True)
        if banner:
            print(banner.replace("{address}", address), flush=True)
        await stop.wait()
        print("shutting down: draining in-flight calls", flush=True)


def _start(
    args: argparse.Namespace, config_path: Path | None, environ: dict[str, str], banner: str | None
) -> int:
    """Serve in this process, or supervise `--workers` processes serving the same port."""
    config = load_config(config_path, environ)
    if args.pin_workers:
        config = replace(config, pin_workers=True)
    workers = args.workers if args.workers is not None else config.workers
    if args.worker_of is not None or workers == 1:
        pinned_cpu = None
        if args.worker_index is not None:
            # Each worker serves its own metrics endpoint: the configured port + its index.
            config = replace(config, metrics=config.metrics.for_worker(args.worker_index))
            # Before the event loop and gRPC start their threads, which inherit the CPU.
            pinned_cpu = affinity.pin_worker(args.worker_index) if config.pin_workers else None
        eventloop.run(
            _serve(config, banner, args.log_level, args.worker_of, pinned_cpu, args.shared_limits),
            args.event_loop,
        )
        return 0
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    eventloop.loop_factory(args.event_loop)  # an unavailable loop fails here, not in every worker
    worker_argv = [sys.executable, "-m", "server", "--event-loop", args.event_loop]
    if args.log_level:
        worker_argv += ["--log-level", args.log_level]
    if args.pin_workers:
        worker_argv.append("--pin-workers")
    if config_path is not None:
        worker_argv += ["--config", str(config_path)]
    # The per-user rate limits hold for the host: every worker maps the same tables. Their files
    # go as soon as every worker has them open, so that not even a SIGKILL of this process leaves
    # them behind in /dev/shm.
    with SharedLimitTables.created(RATE_LIMITS, config.limits.max_tracked_users) as tables:
        worker_argv += [supervisor.SHARED_LIMITS_FLAG, str(tables.directory)]
        return asyncio.run(
            supervisor.Supervisor(
                worker_argv,
                workers=workers,
                listen=config.listen,
                grace_seconds=config.shutdown_grace_seconds,
            ).run([banner] if banner else [], on_ready=tables.remove)
        )


def _run(args: argparse.Namespace) -> int:
    environ = {**os.environ, **({"DIALOG_LISTEN": args.listen} if args.listen else {})}
    if not args.dev:
        return _start(args, args.config, environ, None)
    # Checked before anything is created or started; DIALOG_LISTEN wins over the config we write.
    listen = environ.get("DIALOG_LISTEN") or DEFAULT_LISTEN
    devstack.check_loopback(listen)
    paths = devstack.DevPaths((args.data_dir or devstack.default_data_dir()).absolute())
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    devstack.ensure_secret(paths.secret)
    embedded = EmbeddedPostgres(paths.postgres, port=args.pg_port)
    print(f"starting embedded PostgreSQL in {paths.postgres} on port {args.pg_port}", flush=True)
    try:
        embedded.start()
        devstack.write_config(paths, embedded.dsn, listen=listen)
        banner = _DEV_BANNER.replace("{data_dir}", str(paths.data_dir))
        return _start(args, paths.config, environ, banner)
    finally:
        print("stopping embedded PostgreSQL", flush=True)
        embedded.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Until the config is read (it may say otherwise), log as its defaults say.
    configure_logging(LogConfig(level=args.log_level.upper()) if args.log_level else LogConfig())
    # Until the event loop installs its own handlers, SIGTERM interrupts startup like Ctrl-C
    # does, so the `finally` blocks stop an embedded PostgreSQL that was already started.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    # Every reason the server cannot start is a StartupError (server.errors); an OSError is the
    # operating system refusing something else startup needs, such as the --dev data directory.
    except (StartupError, OSError) as exc:
        print(f"dialog-server: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dialog-server: interrupted during startup", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
