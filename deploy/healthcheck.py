"""Container health probe: exit 0 when the server's grpc.health.v1 Check answers SERVING.

Usage: python healthcheck.py [HOST:PORT] [SERVICE]   (default 127.0.0.1:50051, overall health "")

Used by the Dockerfile's HEALTHCHECK (Kubernetes uses its built-in `grpc:` probe instead). It needs
nothing but the packages the server itself depends on (grpcio, grpcio-health-checking). Plaintext
only: with [tls] configured, probe through a sidecar or use `grpc_health_probe -tls`.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
TIMEOUT_SECONDS = 3.0


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else DEFAULT_TARGET
    service = argv[2] if len(argv) > 2 else ""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS
            )
    except grpc.RpcError as exc:
        print(f"{target}: health check failed: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target}: {status}", file=sys.stderr)
        return 1
    print(f"{target}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
