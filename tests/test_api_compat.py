"""`buf breaking` against the released API (api/released.json) catches breaking changes.

A copy of the buf workspace in a temporary directory is changed one way at a time and checked
against the committed baseline, as `make lint` checks the real tree: renaming, renumbering or
retyping a field and removing an RPC fail; adding a field, a message or an RPC passes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "api" / "released.json"
BUF = ROOT / "node_modules" / ".bin" / "buf"
DIALOG_PROTO = Path("protos/dialog/v1/dialog_service.proto")

pytestmark = pytest.mark.skipif(
    not BUF.exists(), reason="buf is not installed: `npm ci` (make lint does it) brings it"
)


def buf_breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(BASELINE)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """The repository's buf workspace (buf.yaml + protos/) in a temporary directory."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def edit(workspace: Path, old: str, new: str) -> None:
    path = workspace / DIALOG_PROTO
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in {DIALOG_PROTO}"
    path.write_text(text.replace(old, new))


def test_the_current_api_is_compatible_with_the_release(workspace: Path) -> None:
    result = buf_breaking(workspace)
    assert result.returncode == 0, result.stdout + result.stderr


BREAKING: dict[str, tuple[Callable[[Path], None], str]] = {
    "rename a field": (
        lambda w: edit(w, "string request_id = 4;", "string idempotency_key = 4;"),
        r'changed name from "request_id" to "idempotency_key"',
    ),
    "renumber a field": (
        lambda w: edit(w, "bool replayed = 2;", "bool replayed = 3;"),
        r'field "2" with name "replayed" on message "SendMessageResponse" was deleted',
    ),
    "retype a field": (
        lambda w: edit(w, "int32 page_size = 3;", "int64 page_size = 3;"),
        r'"page_size" on message "GetDialogRequest" changed type from "int32" to "int64"',
    ),
    "remove an RPC": (
        lambda w: edit(
            w,
            "rpc GetDialog(GetDialogRequest) returns (GetDialogResponse);",
            "",
        ),
        r'"GetDialog" on service "DialogService" was deleted',
    ),
}


@pytest.mark.parametrize("change", BREAKING)
def test_breaking_changes_are_refused(workspace: Path, change: str) -> None:
    apply, expected = BREAKING[change]
    apply(workspace)
    result = buf_breaking(workspace)
    assert result.returncode != 0, f"{change} passed buf breaking"
    assert re.search(expected, result.stdout + result.stderr), result.stdout + result.stderr


def test_additive_changes_pass(workspace: Path) -> None:
    edit(
        workspace,
        "bool replayed = 2;",
        "bool replayed = 2;\n  // When the server stored the message (added).\n  int64 stored_at_ms = 3;",
    )
    path = workspace / DIALOG_PROTO
    path.write_text(
        path.read_text() + "\n// An added message.\nmessage Extra {\n  // A field.\n  string note = 1;\n}\n"
    )
    result = buf_breaking(workspace)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_baseline_holds_the_v1_services() -> None:
    text = BASELINE.read_text()
    for name in ("dialog/v1/dialog_service.proto", "dialog/v1/admin_service.proto", '"DialogService"'):
        assert name in text
