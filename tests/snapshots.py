"""Generated sources as snapshots: ``tests/golden/<name>.py`` holds the reviewed text of each rendered kernel."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def assert_matches_golden(name: str, source: str) -> None:
    """The rendered ``source`` equals the snapshot; ``ITNET_UPDATE_GOLDEN=1`` rewrites it (review the diff)."""
    golden = GOLDEN / f"{name}.py"
    if os.environ.get("ITNET_UPDATE_GOLDEN"):
        golden.write_text(source)
    assert source == golden.read_text(), "generated kernel changed: review it, then rerun with ITNET_UPDATE_GOLDEN=1"
