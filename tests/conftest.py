"""Test setup: the repo root and the stub WebUI (tests/stubs) go on sys.path, as in the WebUI."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# MKL's fp32 matmuls may sum in an order that depends on the buffers' memory alignment, so two identical training
# runs can differ in the last bits (measured: the IP resume-bit-for-bit tests failed 3 runs in 4 with 2 threads).
# Its strict reproducibility mode removes that; it must be set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "stubs", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
