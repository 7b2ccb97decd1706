"""Imports run one way (STYLE.md): everything may import ir; passes never import backends; frontend never imports
passes; ir imports none of the other layers. Also: only config.py reads os.environ, and nothing unpickles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "itnet_compiler"
FORBIDDEN = {
    "ir": {"frontend", "passes", "backends", "api", "cli"},
    "passes": {"backends", "frontend", "cli"},
    "frontend": {"passes", "backends", "cli"},
    "backends": {"frontend", "passes", "cli"},
}


def _imports(path: Path, root: Path = PKG) -> set[str]:
    """Top-level itnet_compiler subpackages that ``path`` imports (absolute or relative)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(root).parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-1])[: len(rel) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:
                    parts = [a.name for a in node.names]
                found.add(parts[0])
            elif node.module and node.module.startswith("itnet_compiler."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("itnet_compiler."):
                    found.add(a.name.split(".")[1])
    return found


FILES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_run_one_way(path):
    layer = path.relative_to(PKG).parts[0]
    bad = _imports(path) & FORBIDDEN.get(layer, set())
    assert not bad, f"{path.relative_to(PKG)} ({layer}) imports {sorted(bad)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_environ_outside_config_and_no_pickle(path):
    text = path.read_text()
    if path.name != "config.py":
        assert "os.environ" not in text, f"{path.name} reads os.environ; add a knob to config.py"
    assert "import pickle" not in text and "torch.load(" not in text and "eval(" not in text.replace("model.eval(", "")


def test_modules_stay_small():
    big = [str(p.relative_to(PKG)) for p in FILES if len(p.read_text().splitlines()) > 600]
    assert not big, f"split these modules by concern: {big}"


def test_layering_check_can_fail(tmp_path):
    root = tmp_path / "itnet_compiler"
    (root / "passes").mkdir(parents=True)
    probe = root / "passes" / "probe.py"
    probe.write_text("from ..backends.torch import codegen\nimport itnet_compiler.frontend.export\n")
    assert _imports(probe, root) == {"backends", "frontend"}
