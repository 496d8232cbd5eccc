"""A bare grpc.aio echo server: the gRPC ceiling of this machine for `make bench`.

One generic handler, `/bench.Echo/Echo`, returns the request bytes unchanged: no protobuf parsing, no
interceptors, no storage. It is served the way `server.runtime.app` serves (grpc.aio, the same event loop
choice, the same server option), so the difference to SendMessage is what the service itself costs.

    python -m bench.echo_server --listen 127.0.0.1:0 [--event-loop auto]
    # prints "echo serving on HOST:PORT (event loop: uvloop)"
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from server.runtime import eventloop

SERVICE = "bench.Echo"
METHOD = "Echo"
PATH = f"/{SERVICE}/{METHOD}"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"echo serving on {listen.rsplit(':', 1)[0]}:{port} (event loop: {eventloop.name()})",
        flush=True,
    )
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto")
    args = parser.parse_args()
    eventloop.run(serve(args.listen), args.event_loop)


if __name__ == "__main__":
    main()
