"""Command-line tools shipped with dialog-shard (`dialogctl`)."""

import os

# gRPC's C core logs a failed TLS handshake on stderr at INFO level, before dialogctl prints its own
# one-line error; quiet it unless the caller asked for gRPC's logs. It is read when grpc is first
# imported, so it is set here, before any module of this package imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
