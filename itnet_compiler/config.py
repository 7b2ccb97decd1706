"""Every environment knob of itnet, in one place (nothing else reads ``os.environ``)."""

from __future__ import annotations

import os
from pathlib import Path


def debug_level() -> int:
    """``ITNET_DEBUG``: 0 quiet, 1 pass names, 2 IR after each pass, 3 generated sources too."""
    try:
        return int(os.environ.get("ITNET_DEBUG", "0"))
    except ValueError:
        return 0


def cache_dir() -> Path:
    """``ITNET_CACHE_DIR``: where generated code is written (default ``~/.cache/itnet``)."""
    return Path(os.environ.get("ITNET_CACHE_DIR", Path.home() / ".cache" / "itnet"))


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE``: the ``hf:`` model spec never downloads when set (the default here)."""
    return os.environ.get("HF_HUB_OFFLINE", "1") != "0"


def set_hf_offline() -> None:
    """Make transformers stay offline for the ``hf:`` spec unless the user asked otherwise."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU through Triton's interpreter (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_types() -> bool:
    """``ITNET_CHECK_TYPES=1``: every forward checks each node's result against its declared IR type (slow; debug)."""
    return os.environ.get("ITNET_CHECK_TYPES", "0") not in ("", "0")


def child_env_without(*names: str) -> dict[str, str]:
    """This process's environment minus ``names`` (a child that must not run Triton's interpreter)."""
    return {k: v for k, v in os.environ.items() if k not in names}
