"""Regenerate the Python stubs of `protos/` into `client/gen/`.

protoc writes modules that import each other as `dialog.v1.x_pb2`; this script
rewrites those imports to `client.gen.dialog.v1.x_pb2` so the generated code
lives inside the client package (as temporalio's `scripts/gen_protos.py` does).

`--check` regenerates into a temporary directory and fails when the committed
stubs differ, so stale stubs break `make lint` and the test suite. The generated
`*_pb2_grpc.py` embed the generator's version, so the stubs are only reproducible
with the grpcio-tools that requirements/dev.lock pins: a different one installed is
reported as such (run `make install`), not as stale stubs.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_DIR = ROOT / "client" / "gen"
PACKAGE_PREFIX = "client.gen"
LOCK = ROOT / "requirements" / "dev.lock"

_LOCKED_TOOLS_RE = re.compile(r"^grpcio-tools==(\S+)", re.MULTILINE)

_IMPORT_RE = re.compile(r"^(from|import) dialog\.v1", re.MULTILINE)


def _generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *protos,
        ],
        check=True,
        cwd=ROOT,
        env=env,
    )
    for path in out.rglob("*.py*"):
        text = path.read_text()
        path.write_text(_IMPORT_RE.sub(rf"\1 {PACKAGE_PREFIX}.dialog.v1", text))
    for package_dir in {out, *(p.parent for p in out.rglob("*.py"))}:
        init = package_dir / "__init__.py"
        if not init.exists():
            init.write_text("")
    (out / "__init__.py").write_text('"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n')


def _generator_mismatch() -> str | None:
    """Why this environment cannot reproduce the committed stubs, or None when it can."""
    locked = _LOCKED_TOOLS_RE.search(LOCK.read_text())
    if locked is None:
        return f"{LOCK.relative_to(ROOT)} pins no grpcio-tools"
    installed = importlib.metadata.version("grpcio-tools")
    if installed != locked.group(1):
        return (
            f"grpcio-tools {installed} is installed but {LOCK.relative_to(ROOT)} pins {locked.group(1)}; "
            "run `make install` (or `make lock` to move the pin on purpose, then `make proto`)"
        )
    return None


def _diff(left: Path, right: Path) -> list[str]:
    names = {p.relative_to(left) for p in left.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    names |= {p.relative_to(right) for p in right.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return sorted(
        str(n)
        for n in names
        if not (
            (left / n).exists() and (right / n).exists() and filecmp.cmp(left / n, right / n, shallow=False)
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if client/gen is stale")
    args = parser.parse_args()
    mismatch = _generator_mismatch()
    if mismatch is not None:
        print(mismatch, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        fresh.mkdir()
        _generate(fresh)
        if args.check:
            stale = _diff(fresh, OUT_DIR) if OUT_DIR.exists() else ["client/gen (missing)"]
            if stale:
                print("generated stubs are stale; run `make proto`. Differing files:", *stale, sep="\n  ")
                return 1
            print("generated stubs are up to date")
            return 0
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        shutil.copytree(fresh, OUT_DIR)
        print(f"wrote {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
