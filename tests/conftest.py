"""Shared fixtures: each real model is built, run eagerly and converted at most once per test module.

Tests select a model with ``@pytest.mark.parametrize("case", names, indirect=True)``. The module-scoped ``zoo``
memoises everything derived from a model, so the result does not depend on the order pytest runs tests in.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so CI is reproducible (bench/ holds the long random runs).
settings.register_profile("itnet", derandomize=True)
settings.load_profile("itnet")
from models import DYNAMIC, FACTORIES, Case  # noqa: E402

import itnet_compiler as itc  # noqa: E402


class Zoo:
    """A per-module memo of models, conversions, eager outputs and built modules."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, ...], object] = {}

    def memo(self, key: tuple[str, ...], make: Callable[[], object]) -> object:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture
def case(request: pytest.FixtureRequest, zoo: Zoo) -> Case:
    name = request.param
    made = zoo.memo(("case", name), (FACTORIES.get(name) or DYNAMIC[name]))
    assert made.name == name, f"factory {name} names its case {made.name}"
    return made


@pytest.fixture
def prog(case: Case, zoo: Zoo) -> itc.Program:
    return zoo.memo(
        ("prog", case.name),
        lambda: itc.convert(case.model, case.args, case.kwargs, dynamic_shapes=case.dynamic_shapes),
    )


@pytest.fixture
def eager_out(case: Case, zoo: Zoo) -> object:
    """The source model's output on the example inputs (grad mode on, so torch.nn takes its exported path)."""

    def run() -> object:
        with torch.enable_grad():
            return case.model(*case.args, **case.kwargs)

    return zoo.memo(("eager", case.name), run)
