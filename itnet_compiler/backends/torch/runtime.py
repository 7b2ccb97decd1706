"""Per-module run-time state of approximate lowerings: error estimates they report and factors they fit or cache.

Approximate lowerings are plain functions called from generated FX code, so they cannot hold state themselves. A
``RuntimeState`` is activated around a forward (``with state: module(x)``); while it is active, a Monte Carlo
lowering writes its self-estimated error under its layer name (``state.errors``), and low-rank lowerings keep what
is expensive to recompute (factorised weights, factors fitted on calibration activations) in ``state.cache``. With
no active state every call is self-contained: nothing is reported and everything is recomputed.

The built module is meant to own one state and activate it in its forward, exposing ``error_estimates``; until
then, a caller activates a state around the call itself.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")

_ACTIVE: contextvars.ContextVar[RuntimeState | None] = contextvars.ContextVar("itnet_runtime", default=None)


@dataclass(frozen=True)
class ErrorEstimate:
    """A lowering's estimate of its own error on one call, from its samples.

    ``abs`` is the root of the summed per-entry variances (the expected Frobenius norm of the error, bias aside);
    ``rel`` divides it by the Frobenius norm of the output, so it is comparable with ``‖ŷ - y‖ / ‖y‖``.
    """

    abs: float
    rel: float
    samples: int
    fallback_rows: int = 0  # rows computed exactly because none of their samples fell in their support

    def to_dict(self) -> dict[str, float | int]:
        return {"abs": self.abs, "rel": self.rel, "samples": self.samples, "fallback_rows": self.fallback_rows}


@dataclass
class RuntimeState:
    """What the approximate lowerings of one built module report and keep between calls."""

    errors: dict[str, ErrorEstimate] = field(default_factory=dict)
    cache: dict[tuple[object, ...], tuple[tuple[object, ...], object]] = field(default_factory=dict)
    _tokens: list[contextvars.Token] = field(default_factory=list, repr=False)

    def __enter__(self) -> RuntimeState:
        self._tokens.append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._tokens.pop())

    def error_table(self) -> dict[str, dict[str, float | int]]:
        """Layer -> estimate as JSON-able data (what a plan file records next to the chosen lowering)."""
        return {layer: est.to_dict() for layer, est in sorted(self.errors.items())}


def active() -> RuntimeState | None:
    return _ACTIVE.get()


def report_error(layer: str, estimate: ErrorEstimate) -> None:
    """Record ``estimate`` for ``layer`` in the active state (the last call of a layer in a forward wins)."""
    state = _ACTIVE.get()
    if state is not None and layer:
        state.errors[layer] = estimate


def _fingerprint(tensors: tuple[torch.Tensor, ...]) -> tuple[object, ...]:
    # In-place updates bump _version, so a weight trained between calls is never served stale factors.
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


def cached(key: tuple[object, ...], depends_on: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
    """``make()``, memoised in the active state under ``key`` while the tensors in ``depends_on`` are unchanged."""
    state = _ACTIVE.get()
    if state is None:
        return make()
    stamp = _fingerprint(depends_on)
    hit = state.cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]  # type: ignore[return-value]
    value = make()
    state.cache[key] = (stamp, value)
    return value
