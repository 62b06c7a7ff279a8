"""Test setup: the repo root and the stub WebUI (tests/stubs) go on sys.path, as in the WebUI."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "stubs", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
