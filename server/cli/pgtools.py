"""Finding and running PostgreSQL's client programs (pg_dump, pg_restore) for dialogctl.

Search order: `--pg-bindir DIR`, `$DIALOG_PG_BINDIR`, `PATH`, `pg_config --bindir`, the binaries
bundled by the PyPI package `pgserver`. A password in a DSN goes to the child in `PGPASSWORD`,
never on its command line (where `ps` would show it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from server.cli.session import CliError
from server.dev.embedded_pg import pg_config_bindir

#: Exit status of a failed external program (pg_dump, pg_restore).
EXIT_TOOL_FAILED = 1

_INSTALL_HINT = (
    "install the PostgreSQL client programs (e.g. `apt-get install postgresql-client`, "
    "`brew install libpq`), or pass --pg-bindir DIR (or set DIALOG_PG_BINDIR) to where they are"
)


def _candidates(bindir: Path | None) -> list[Path]:
    dirs: list[Path] = []
    if bindir is not None:
        return [bindir.expanduser()]
    env = os.environ.get("DIALOG_PG_BINDIR")
    if env:
        return [Path(env).expanduser()]
    configured = pg_config_bindir()
    if configured is not None:
        dirs.append(configured)
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("pgserver")  # does not import it (importing has side effects)
        if spec is not None and spec.submodule_search_locations:
            dirs.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    return dirs


def find_tool(name: str, bindir: Path | None = None) -> Path:
    """The path of PostgreSQL program `name`, or a CliError saying how to get it."""
    if bindir is None and not os.environ.get("DIALOG_PG_BINDIR"):
        on_path = shutil.which(name)
        if on_path is not None:
            return Path(on_path)
    for directory in _candidates(bindir):
        candidate = directory / name
        if os.access(candidate, os.X_OK):
            return candidate
    where = f" in {bindir}" if bindir is not None else ""
    raise CliError(f"{name} not found{where}: {_INSTALL_HINT}")


def _run(
    argv: Sequence[str], failure: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool; when it fails, `failure` plus the last line of its stderr is the error."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise CliError(f"cannot run {argv[0]}: {exc.strerror or exc}", EXIT_TOOL_FAILED) from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise CliError(f"{failure}: {reason}", EXIT_TOOL_FAILED)
    return done


def list_archive(pg_restore: Path, archive: Path) -> str:
    """`pg_restore --list --verbose ARCHIVE`: the archive's table of contents, with dependencies."""
    argv = [str(pg_restore), "--list", "--verbose", str(archive)]
    return _run(argv, f"{archive} is not a readable pg_dump archive").stdout


def run_tool(program: Path, args: Sequence[str], dsn: str, what: str) -> str:
    """Run `program args --dbname=DSN`; its stderr's last line becomes the error when it fails."""
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    argv = [str(program), *args, "--dbname=" + make_conninfo("", **params)]
    return _run(argv, f"{what}: {program.name} failed", env).stderr
