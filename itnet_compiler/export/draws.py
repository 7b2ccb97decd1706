"""Seeded random draws made at export time: an approximate lowering's torch code is run once eagerly while every
draw it makes from its own ``torch.Generator`` is recorded, then traced while the same calls return those tensors,
which the exported graph holds as constants. The exported model then computes what the torch backend computes on
any input of the example sizes (the draws depend on the sizes, so those stay static). Draws whose distribution
reads the data (``torch.multinomial``) cannot be fixed this way and are refused with one line."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch

from ..errors import ItnetError

_PATCHED = ("rand", "randn", "randperm", "randint")
# Functions of the lowerings whose result depends only on their arguments and a seeded generator (random feature
# maps built with QR, which no exported graph should recompute): recorded and replayed whole.
SEEDED = (("itnet_compiler.backends.torch.pairkernel", "orthogonal_gaussian"),)


@contextlib.contextmanager
def _patch(wrap) -> Iterator[None]:
    """``wrap(fn, seeded)`` replaces each generator-driven torch sampler (seeded=False: only calls given a
    ``generator`` are drawn) and each SEEDED function (seeded=True: every call is a draw)."""
    saved = {(torch, name): getattr(torch, name) for name in (*_PATCHED, "multinomial")}
    for mod_name, name in SEEDED:
        mod = importlib.import_module(mod_name)
        saved[(mod, name)] = getattr(mod, name)
    try:
        for (mod, name), fn in saved.items():
            setattr(mod, name, _refuse(fn) if name == "multinomial" else wrap(fn, mod is not torch))
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


def _refuse(fn):
    def call(*args, **kwargs):
        if kwargs.get("generator") is not None:
            raise ItnetError(
                "this lowering draws samples from a data-dependent distribution (torch.multinomial), "
                "which an exported graph cannot reproduce; plan an exact lowering for this layer (for "
                "attention, montecarlo with mode=per_row and proposal=norm or uniform exports)"
            )
        return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def record(store: list[torch.Tensor]) -> Iterator[None]:
    depth = [0]  # draws made inside a recorded seeded function are part of its result, not recorded again

    def wrap(fn, seeded: bool):
        def call(*args, **kwargs):
            drawn = seeded or kwargs.get("generator") is not None
            depth[0] += drawn
            try:
                out = fn(*args, **kwargs)
            finally:
                depth[0] -= drawn
            if drawn and depth[0] == 0:
                store.append(out.clone())
            return out

        return call

    with _patch(wrap):
        yield


@contextlib.contextmanager
def replay(store: list[torch.Tensor]) -> Iterator[None]:
    pending = list(store)

    def wrap(fn, seeded: bool):
        def call(*args, **kwargs):
            if not seeded and kwargs.get("generator") is None:
                return fn(*args, **kwargs)
            if not pending:
                raise ItnetError("the lowering drew more samples while being traced than when it ran")
            return pending.pop(0).clone()

        return call

    with _patch(wrap):
        yield
