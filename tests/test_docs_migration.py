"""Run the trio-rignet ("After") examples of docs/migration.md and check what they print.

The "Before" blocks are iblutil code, shown for comparison; they need iblutil and are
not run here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "migration.md"
_AFTER = re.compile(
    r"^### After\n.*?^```python\n(?P<code>.*?)^```\n.*?^```text\n(?P<out>.*?)^```",
    re.M | re.S,
)


def _examples() -> list[tuple[str, str]]:
    found = [(m["code"], m["out"]) for m in _AFTER.finditer(PAGE.read_text())]
    assert len(found) == 2, "docs/migration.md should have two 'After' examples"
    return found


@pytest.mark.parametrize(("code", "expected"), _examples(), ids=["main-pc", "auxiliary-pc"])
def test_migration_after_example(code: str, expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines() == expected.splitlines()
