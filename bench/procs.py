"""What the benchmark starts and stops: PostgreSQL shard servers, the dialog server, the echo server.

Everything is registered on a `contextlib.ExitStack` right after it starts, so it is stopped (and the
temporary directory removed) on success, on errors and on Ctrl-C alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from server.dev.embedded_pg import EmbeddedPostgres, start_on_a_free_port

REPO = Path(__file__).resolve().parent.parent
_SERVING = re.compile(r"serving on (\S+:\d+)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")


def scratch_dir(prefix: str, stack: contextlib.ExitStack) -> Path:
    """A fresh directory (in memory where /dev/shm is writable), removed when `stack` closes.

    Mode 0711: PostgreSQL runs as an unprivileged user when we are root, and must reach its data.
    """
    root = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    path.chmod(0o711)
    return path


def start_postgres(
    root: Path, count: int, stack: contextlib.ExitStack, settings: dict[str, str]
) -> list[EmbeddedPostgres]:
    """`count` PostgreSQL servers started in parallel, durable (fsync and synchronous_commit on)."""

    def start(index: int) -> EmbeddedPostgres:
        return start_on_a_free_port(
            lambda port: EmbeddedPostgres(root / f"pg{index}", port=port, fsync=True, settings=settings)
        )

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start, i) for i in range(count)]
        concurrent.futures.wait(futures)
    servers = [f.result() for f in futures if f.exception() is None]
    for server in servers:
        stack.callback(_stop_quietly, server)
    for future in futures:
        future.result()  # the first failure, once the servers that did start will be stopped
    return servers


def pgbench_login(server: EmbeddedPostgres) -> dict[str, str]:
    """`run_pgbench`'s connection parts for `server`'s database (the password from its file)."""
    return {
        "host": "127.0.0.1",
        "port": str(server.port),
        "user": "postgres",
        "dbname": server.database,
        "passfile": str(server.password_file),
    }


def _stop_quietly(server: EmbeddedPostgres) -> None:
    try:
        server.stop("fast")
    except Exception as exc:
        print(f"bench: could not stop PostgreSQL in {server.data_dir}: {exc}", file=sys.stderr)


class ServerProcess:
    """A server started as its own process (own session: Ctrl-C reaches only us, we stop it in order)."""

    def __init__(self, name: str, argv: list[str], log_file: Path, stack: contextlib.ExitStack) -> None:
        self.name = name
        self.log_file = log_file
        self._log = log_file.open("w")
        stack.callback(self._log.close)
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )
        stack.callback(self.stop)
        self.address = self._wait_serving()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics_urls(self, count: int, timeout: float = 30.0) -> list[str]:
        """The metrics endpoints the server printed, once `count` of them (one per worker) are."""
        deadline = time.monotonic() + timeout
        while True:
            urls = _METRICS.findall(self.log_file.read_text(errors="replace"))
            if len(urls) >= count or time.monotonic() > deadline:
                return urls
            time.sleep(0.05)

    def _wait_serving(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_file.read_text(errors="replace")
            match = _SERVING.search(text)
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start serving within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a server with worker processes counts as a whole)."""
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def worker_cpu_seconds(pid: int) -> list[float]:
    """CPU seconds of each direct child of `pid` with its own descendants (a server's workers)."""
    return [cpu_seconds([child]) for child in sorted(_children().get(pid, []))]


def counter_totals(urls: list[str], names: set[str]) -> dict[str, float]:
    """The sum over every endpoint and label set of each named Prometheus sample."""
    totals = dict.fromkeys(names, 0.0)
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
    return totals


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` and its descendants, in KiB."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the given processes and their descendants,
    including descendants that have exited and were reaped."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for root in pids:
        for p in process_tree(root):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                # utime, stime, and cutime, cstime: the children it already reaped (PostgreSQL
                # backends of connections that closed, such as pgbench's, live on only there).
                total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / ticks


def machine_cpu_ticks(stat: str | None = None) -> tuple[int, int]:
    """(idle, total) clock ticks of all CPUs so far, from /proc/stat (or `stat`, its text).

    Idle counts iowait too: a core waiting for a disk could have run something else."""
    if stat is None:
        stat = Path("/proc/stat").read_text()
    values = [int(v) for v in stat.split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user and nice]
    return values[3] + values[4], sum(values[:8])


def idle_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU time that went idle between two `machine_cpu_ticks()`."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def postmaster_pids(servers: Iterable[EmbeddedPostgres]) -> list[int]:
    """The postmasters of the running servers (their backends are their descendants)."""
    pids = []
    for server in servers:
        try:
            pids.append(abs(int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])))
        except (OSError, ValueError):
            continue
    return pids


def ensure_h2load() -> str:
    """The h2load binary; installs nghttp2-client with apt-get when missing and running as root."""
    found = ensure_debian_binary("h2load", "nghttp2-client")
    if found is None:
        raise SystemExit(
            "bench: h2load is missing: install it with "
            "`sudo apt-get install -y nghttp2-client` (Debian/Ubuntu)"
        )
    return found


def ensure_debian_binary(binary: str, package: str) -> str | None:
    """`binary` on PATH, installing Debian's `package` with apt-get when missing and running as root.

    None when it is missing and cannot be installed here (not root, no apt-get, or the install failed),
    so the caller says what to install by hand. Machines without the tool get it from the project's own
    files (the benchmark, the test suite), not from a step someone once ran by hand.
    """
    found = shutil.which(binary)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print(f"installing {package} ({binary}) with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        # Fresh containers have no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, check=False)
        subprocess.run(install, env=env, check=False)
    return shutil.which(binary)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so a benchmark stopped either way stops what it started."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
