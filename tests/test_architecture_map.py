"""docs/architecture.md stays the map of the package: its module index lists every module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_module_index_is_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "module_index.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_module_index_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    index = text.split("<!-- module-index:start -->", 1)[1].split("<!-- module-index:end -->")[0]
    for path in (ROOT / "src" / "fortify").rglob("*.py"):
        pkg = path.relative_to(ROOT / "src").parent
        section = index.split(f"**`{pkg}/`**", 1)
        assert len(section) == 2, f"package {pkg} missing from the index"
        assert f"- `{path.name}` — " in section[1].split("**`", 1)[0], path
