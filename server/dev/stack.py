"""The newcomer's stack behind `make run`: one embedded PostgreSQL, four shard tables, a dev key.

Everything lives in one data directory (default `.data/`) and survives
restarts: the PostgreSQL cluster, a generated HS256 key (never committed) and
the `dialog-shard.toml` that the server and `dialogctl` both read.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from server.config import DEFAULT_LISTEN, DEFAULT_NUM_SHARDS, render_config

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


def default_data_dir() -> Path:
    return Path(os.environ.get("DIALOG_DATA_DIR", DEFAULT_DATA_DIR)).absolute()


def ensure_secret(path: Path) -> None:
    """Create a random HS256 key on first use; keep it for later runs."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48) + "\n")


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
            comment="Written by `dialog-server --dev`; regenerated on every dev start.",
        )
    )
