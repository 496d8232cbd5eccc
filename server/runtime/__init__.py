"""The running process: the app's lifetime, worker processes, the event loop and CPU pinning.

- `app`: the server's whole lifetime as one async context manager.
- `supervisor`: `--workers N` processes sharing one port.
- `eventloop`: uvloop or asyncio.
- `affinity`: pinning a worker to one CPU.
"""
