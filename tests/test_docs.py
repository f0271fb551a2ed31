"""Docs that must stay true: every setting and every error code is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_doc_lists_every_setting_as_generated() -> None:
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-config-doc")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert table.strip() in doc, "regenerate docs/configuration.md with scripts/gen-config-doc"
    assert "|  |" not in table, "every setting needs a description"


def test_errors_doc_lists_every_code_raised() -> None:
    codes: set[str] = set()
    for package in ("twin_service", "search", "connectivity"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            codes |= set(re.findall(r'(?:code=|default_code = )"([a-z]+(?:\.[a-z]+)+)"', text))
    doc = (ROOT / "docs" / "errors.md").read_text()
    missing = sorted(code for code in codes if f"`{code}`" not in doc)
    assert not missing, f"codes missing from docs/errors.md: {missing}"
