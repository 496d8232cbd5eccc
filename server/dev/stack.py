"""The newcomer's stack behind `make run`: one embedded PostgreSQL, four shard tables, a dev key.

Everything lives in one data directory (default `.data/`) and survives
restarts: the PostgreSQL cluster (its password in `postgres/pgpass`), a generated
HS256 key (never committed) and the `dialog-shard.toml` that the server and
`dialogctl` both read.

Safe defaults: the dev server serves only on a loopback address, and refuses a key
file that other users could read or that belongs to someone else.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import secrets
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from server.config import DEFAULT_LISTEN, DEFAULT_NUM_SHARDS, ConfigError, render_config, split_host_port
from server.errors import StartupError

DEFAULT_DATA_DIR = Path(".data")
DEFAULT_PG_PORT = 54329
CONFIG_NAME = "dialog-shard.toml"
SECRET_NAME = "dev-jwt-secret"


@dataclass(frozen=True, slots=True)
class DevPaths:
    data_dir: Path

    @property
    def config(self) -> Path:
        return self.data_dir / CONFIG_NAME

    @property
    def secret(self) -> Path:
        return self.data_dir / SECRET_NAME

    @property
    def postgres(self) -> Path:
        return self.data_dir / "postgres"


class DevStackError(StartupError):
    """`--dev` refuses to start: an unsafe listen address or dev key file."""


def check_loopback(listen: str) -> None:
    """Refuse a listen address other machines could reach: the dev stack's key and data are throwaway."""
    try:
        host, _ = split_host_port(listen)
    except ConfigError as exc:
        raise DevStackError(str(exc)) from None
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise DevStackError(
            f"--dev serves only on a loopback address (127.0.0.1, ::1, localhost), not {listen!r}: its "
            "database, dev key and tokens are for this machine. Run without --dev, with a config of "
            "your own, to serve other machines"
        )


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_secret(path: Path) -> None:
    """Refuse a dev key file that is not a regular file of ours readable only by us."""
    st = path.lstat()
    quoted = shlex.quote(str(path))
    if not stat.S_ISREG(st.st_mode):
        raise DevStackError(f"the dev key {path} is not a regular file; remove it to generate a new one")
    if st.st_uid != os.geteuid():
        raise DevStackError(
            f"the dev key {path} belongs to {_owner_name(st.st_uid)}, not to {_owner_name(os.geteuid())} "
            f"who runs the server: remove it to generate a new one (rm {quoted}), or take it over "
            f"(chown {_owner_name(os.geteuid())} {quoted} && chmod 600 {quoted})"
        )
    if st.st_mode & 0o077:
        raise DevStackError(
            f"the dev key {path} is {stat.filemode(st.st_mode)}: other users could read it and sign "
            f"tokens. Run `chmod 600 {quoted}` (or remove it to generate a new one)"
        )


def default_data_dir() -> Path:
    return Path(os.environ.get("DIALOG_DATA_DIR", DEFAULT_DATA_DIR)).absolute()


def ensure_secret(path: Path) -> None:
    """Create a random HS256 key (0600) on first use; keep it for later runs, checking it (check_secret)."""
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass  # created concurrently; checked below
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48) + "\n")
    check_secret(path)


def write_config(
    paths: DevPaths, dsn: str, *, listen: str = DEFAULT_LISTEN, shards: int = DEFAULT_NUM_SHARDS
) -> None:
    """The seed's default layout: `messages_0..N-1` side by side in one database."""
    paths.config.write_text(
        render_config(
            shard_dsns=[dsn] * shards,
            listen=listen,
            control_dsn=dsn,
            auth={"jwt_secret_file": paths.secret.name},
            # Relative to the config file: the archive lives in the data directory too.
            sections={"archive": {"url": "archive"}},
            comment="Written by `dialog-server --dev`; regenerated on every dev start.",
        )
    )
