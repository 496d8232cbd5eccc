"""`make bench`: the service, a bare gRPC echo server and pgbench, measured in one run (issue 7)."""
