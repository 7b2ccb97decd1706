"""Per-module run-time state of approximate lowerings: error estimates they report and factors they fit or cache.

Approximate lowerings are plain functions called from generated FX code, so they cannot hold state themselves. A
``RuntimeState`` is activated around a forward (``with state: module(x)``); while it is active, a Monte Carlo
lowering writes its self-estimated error under its layer name (``state.errors``), and low-rank lowerings keep what
is expensive to recompute (factorised weights, factors fitted on calibration activations) in ``state.cache``. With
no active state every call is self-contained: nothing is reported and everything is recomputed.

The built module owns one state and activates it in its forward (``error_estimates`` reads it). One module may be
called from several threads at once, so activation is per call: the stack of active states lives in a context
variable (each thread and each asyncio task has its own), never on the shared state, and the state's dicts are
written under its lock. Concurrent calls each report complete estimates; the table then holds, per layer, that of
whichever call finished the layer last. A cache miss of one key is computed once, by the first caller; concurrent
callers of that key wait for it rather than fitting the same factors again on their own activations.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from ...errors import ItnetError

T = TypeVar("T")

# Cached values that may be saved with a program (``itc.calibrate``): class name -> class with ``tensors()`` (name ->
# tensor) and ``from_tensors(dict, layer)``. Only data-fitted values independent of the weights qualify (cached with
# no ``depends_on``): what a weight-derived cache holds is recomputed from the weights after loading anyway.
FITTED_KINDS: dict[str, type] = {}


def persistable(cls: type[T]) -> type[T]:
    """Class decorator: instances kept in the cache are saved with a calibrated program and restored on build."""
    FITTED_KINDS[cls.__name__] = cls
    return cls


# The states activated in this context, innermost last: a tuple, so a context copied into a new thread or task
# shares nothing mutable with its parent.
_ACTIVE: contextvars.ContextVar[tuple[RuntimeState, ...]] = contextvars.ContextVar("itnet_runtime", default=())


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
    parts: dict[str, float] | None = None  # the estimate's components, where it combines several (hybrid)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"abs": self.abs, "rel": self.rel, "samples": self.samples}
        out["fallback_rows"] = self.fallback_rows
        if self.parts is not None:
            out["parts"] = dict(self.parts)
        return out


@dataclass
class RuntimeState:
    """What the approximate lowerings of one built module report and keep between calls."""

    errors: dict[str, ErrorEstimate] = field(default_factory=dict)
    cache: dict[tuple[object, ...], tuple[tuple[object, ...], object]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _making: dict[tuple[object, ...], threading.RLock] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __enter__(self) -> RuntimeState:
        _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _ACTIVE.get()
        if not stack or stack[-1] is not self:
            raise RuntimeError(
                "itnet runtime: a state was left while another was active inside it in this thread; "
                "leave states in the reverse order they were entered (nest the with-blocks)"
            )
        _ACTIVE.set(stack[:-1])

    def error_table(self) -> dict[str, dict[str, float | int]]:
        """Layer -> estimate as JSON-able data (what a plan file records next to the chosen lowering)."""
        with self._lock:
            items = sorted(self.errors.items())
        return {layer: est.to_dict() for layer, est in items}

    def record(self, layer: str, estimate: ErrorEstimate) -> None:
        with self._lock:
            self.errors[layer] = estimate

    def making(self, key: tuple[object, ...]) -> threading.RLock:
        """The lock held while the value under ``key`` is computed (reentrant: ``make`` may itself use the cache)."""
        with self._lock:
            return self._making.setdefault(key, threading.RLock())

    def store(self, key: tuple[object, ...], entry: tuple[tuple[object, ...], object]) -> None:
        with self._lock:
            self.cache[key] = entry

    def fitted(self) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
        """What ``persistable`` cache entries hold, as (``meta["fitted"]``, "<layer>::<name>" -> tensor)."""
        meta: dict[str, dict] = {}
        tensors: dict[str, torch.Tensor] = {}
        with self._lock:
            items = sorted(self.cache.items(), key=lambda kv: repr(kv[0]))
        for key, (stamp, value) in items:
            kind = type(value).__name__
            if FITTED_KINDS.get(kind) is not type(value) or stamp != () or not key or not isinstance(key[0], str):
                continue
            named = value.tensors()
            meta[key[0]] = {"kind": kind, "key": list(key), "tensors": sorted(named)}
            tensors.update({f"{key[0]}::{n}": t.detach().cpu().contiguous() for n, t in named.items()})
        return meta, tensors

    def restore(self, meta: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
        """Seed the cache with fitted values saved by ``fitted`` (a bundle's ``meta["fitted"]`` and its tensors)."""
        for layer, entry in meta.items():
            cls = FITTED_KINDS.get(entry["kind"])
            if cls is None:
                raise ItnetError(f"fitted factors of kind {entry['kind']!r} are unknown to this itnet; re-run itnet "
                                 "calibrate", layer=layer)  # fmt: skip
            value = cls.from_tensors({n: tensors[f"{layer}::{n}"] for n in entry["tensors"]}, layer)
            self.store(tuple(entry["key"]), (_fingerprint(()), value))

    def __getstate__(self) -> dict[str, object]:
        # Locks neither copy nor pickle: a copied module (copy.deepcopy) gets fresh ones.
        with self._lock:
            return {"errors": dict(self.errors), "cache": dict(self.cache)}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(**state)


def active() -> RuntimeState | None:
    stack = _ACTIVE.get()
    return stack[-1] if stack else None


def report_error(layer: str, estimate: ErrorEstimate) -> None:
    """Record ``estimate`` for ``layer`` in the active state (the last call of a layer in a forward wins)."""
    state = active()
    if state is not None and layer:
        state.record(layer, estimate)


def _fingerprint(tensors: tuple[torch.Tensor, ...]) -> tuple[object, ...]:
    # In-place updates bump _version, so a weight trained between calls is never served stale factors.
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


def cached(key: tuple[object, ...], depends_on: tuple[torch.Tensor, ...], make: Callable[[], T]) -> T:
    """``make()``, memoised in the active state under ``key`` while the tensors in ``depends_on`` are unchanged."""
    state = active()
    if state is None:
        return make()
    stamp = _fingerprint(depends_on)
    hit = state.cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]  # type: ignore[return-value]
    with state.making(key):
        hit = state.cache.get(key)  # another thread may have computed it while this one waited
        if hit is not None and hit[0] == stamp:
            return hit[1]  # type: ignore[return-value]
        value = make()
        state.store(key, (stamp, value))
    return value
