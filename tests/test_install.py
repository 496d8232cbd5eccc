"""The virtualenv holds exactly what requirements/dev.lock pins, so two installs from it are identical."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"

# `name==version ; marker \` at the start of a line; hash lines follow it.
_PIN_RE = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", re.MULTILINE)


def _pins(lock: Path) -> dict[str, str]:
    """The lock's pins that apply to this interpreter and platform."""
    return {
        canonicalize_name(name): version
        for name, version, marker in _PIN_RE.findall(lock.read_text())
        if not marker or Marker(marker).evaluate()
    }


def _installed() -> dict[str, str]:
    installed: dict[str, str] = {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()
    }
    installed.pop("dialog-shard")
    return installed


def test_every_pin_carries_hashes() -> None:
    for lock in REQUIREMENTS.glob("*.lock"):
        blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text().split("\n", 2)[2])
        unhashed = [block.split()[0] for block in blocks if "==" in block and "--hash=sha256:" not in block]
        assert not unhashed, f"{lock.name}: pins without hashes: {unhashed}"


def test_virtualenv_is_exactly_the_dev_lock() -> None:
    pinned, installed = _pins(REQUIREMENTS / "dev.lock"), _installed()
    assert len(pinned) > 30, "the lock parsed to suspiciously few pins"
    wrong = {
        name: (installed.get(name), version)
        for name, version in pinned.items()
        if installed.get(name) != version
    }
    extra = sorted(set(installed) - set(pinned))
    assert not wrong, f"installed vs locked versions differ (run `make install`): {wrong}"
    assert not extra, f"installed but not locked: {extra}"


def test_runtime_lock_is_the_dev_locks_versions() -> None:
    runtime, dev = _pins(REQUIREMENTS / "runtime.lock"), _pins(REQUIREMENTS / "dev.lock")
    assert {"grpcio", "protobuf", "psycopg", "psycopg-pool"} <= set(runtime)
    assert {name: dev.get(name) for name in runtime} == runtime
    assert "pytest" not in runtime and "grpcio-tools" not in runtime
