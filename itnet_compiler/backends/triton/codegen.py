"""Triton backend: the torch FX module with each it.transform that has a Triton kernel routed to it.

Layers whose (family, lowering) has a kernel here run through it (forward and backward, via autograd Functions).
A layer runs on the torch backend instead, with one warning and an entry in ``module.fallbacks`` (also copied into
``module.program.meta["fallbacks"]``), when its lowering has no kernel, when its inputs are outside what the kernel
takes, or when the kernel fails to compile or launch. Never a wrong answer: the fallback is the reference code.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable

import torch

from ...ir.core import Node, Program
from ...ir.families import parse_lowering
from ..torch.codegen import ItnetModule, generate
from ..torch.registry import LOWERINGS, OPTIONS, implementation
from . import attention, conv, gated, ssm

Entry = Callable[[Node], tuple[Callable[..., object], Callable[..., str | None], set[str]]]
KERNELS: dict[tuple[str, str], Entry] = {}
# Lowerings that are meant to run on the vendor library or the reference: not a fallback when chosen. ``fft`` is
# cuFFT's work (the pointwise product between the transforms is all a generated kernel could add).
TORCH_BY_DESIGN = {"library", "dense", "fft"}


def register(family: str, lowering: str):
    def deco(fn: Entry) -> Entry:
        KERNELS[(family, lowering)] = fn
        return fn

    return deco


@register("dot_exp", "fused")
def _(node: Node):
    opts = {"block_m", "block_n", "num_warps", "num_stages", "bwd_block_m", "bwd_block_n"}

    def check(q, k, v, mask=None, **_: object) -> str | None:
        if node.attrs.return_weights:
            return "the layer returns its attention weights"
        return attention.supported(q, k, v, mask)

    return attention.fused_attention, check, opts


@register("stationary", "fused")
def _(node: Node):
    def check(x, weight, bias=None, **static: object) -> str | None:
        return conv.supported(x, weight, **static)

    options = {"block_c", "block_l", "num_warps", "block_m", "block_n", "block_k", "num_stages"}
    return conv.stationary_conv, check, options


@register("ssm", "scan")
def _(node: Node):
    def check(x, dt, A, B, C, *rest, **_: object) -> str | None:
        return ssm.supported(x, dt, A, B, C)

    return ssm.ssm_scan, check, set()


@register("gated", "scan")
def _(node: Node):
    def check(x, weights, *rest, **static: object) -> str | None:
        return gated.supported(x, weights, **static)

    return gated.gated_scan, check, set()


@register("ssm", "chunked")
def _(node: Node):
    from . import ssd

    def check(x, dt, A, B, C, *rest, **_: object) -> str | None:
        return ssd.supported(x, dt, A, B, C)

    return ssd.ssd_chunked, check, {"chunk", "budget"}


@register("dot_exp", "montecarlo")
def _(node: Node):
    from ..torch.montecarlo import OPTIONS as MC_OPTIONS
    from ..torch.montecarlo import MonteCarloOptions
    from . import montecarlo

    MonteCarloOptions.make(node.name, **{k: v for k, v in parse_lowering(node.attrs.lowering)[1].items()
                                         if k in MC_OPTIONS})  # fmt: skip

    def check(q, k, v, mask=None, **_: object) -> str | None:
        if node.attrs.return_weights:
            return "the layer returns its attention weights"
        return montecarlo.supported(q, k, v, mask)

    # The sampling options are semantic: they reach the kernel through ``opts`` and the torch fallback through the
    # ``ref_opts`` that resolve binds (the options the torch lowering declares); the tile sizes only the kernel.
    return montecarlo.montecarlo_attention, check, set(MC_OPTIONS) | montecarlo.TILE_OPTIONS


@register("dot_exp", "lowrank")
def _(node: Node):
    from ..torch.lowrank import LowRankOptions
    from . import lowrank

    rank = parse_lowering(node.attrs.lowering)[1].get("rank", LowRankOptions.rank)

    def check(q, k, v, mask=None, **static: object) -> str | None:
        return lowrank.supported(q, k, v, mask, rank=int(rank), **static)

    # method, rank, seed, chunk, local, ... are semantic: they reach the kernel through ``opts`` and the torch
    # fallback through the ``ref_opts`` that resolve binds; the tile sizes (block_m, ...) only the kernel.
    return lowrank.attention_lowrank, check, set(lowrank.OPTIONS)


@register("stationary", "lowrank")
def _(node: Node):
    from ..torch.lowrank_conv import ConvLowRankOptions
    from . import conv_approx

    ConvLowRankOptions.make(node.name, **{k: v for k, v in parse_lowering(node.attrs.lowering)[1].items()
                                          if k not in conv_approx.CONV_TILES})  # fmt: skip

    def check(x, weight, bias=None, **static: object) -> str | None:
        return conv_approx.lowrank_supported(x, weight, **static)

    # method, rank, iters, seed, calib are semantic (the factorisation, done by the torch lowering's own code): they
    # reach the kernel through ``opts`` and the torch fallback through ``ref_opts``; the conv tiles only the kernel.
    return conv_approx.conv_lowrank, check, conv_approx.LOWRANK_OPTIONS


@register("stationary", "montecarlo")
def _(node: Node):
    from ..torch.montecarlo import OPTIONS as MC_OPTIONS
    from ..torch.montecarlo import MonteCarloOptions
    from . import conv_approx

    spec = parse_lowering(node.attrs.lowering)[1]
    MonteCarloOptions.make(node.name, **{k: v for k, v in spec.items() if k in MC_OPTIONS})
    mode = spec.get("mode", MonteCarloOptions.mode)

    def check(x, weight, bias=None, **static: object) -> str | None:
        return conv_approx.montecarlo_supported(x, weight, **{**static, "mode": mode})

    # The sampling options are semantic (same draw as the torch lowering, same seed); the tiles only the kernel.
    return conv_approx.conv_montecarlo, check, conv_approx.MONTECARLO_OPTIONS


def _torch_impl(node: Node) -> tuple[Callable[..., object], dict[str, object]]:
    """The torch implementation of the same lowering (options dropped), or the exact ``library`` one if torch has
    none: what a layer runs when its kernel cannot."""
    name, _ = parse_lowering(node.attrs.lowering)
    if (node.family, name) not in LOWERINGS:
        name = "library"
    plain = Node(node.op, node.args, node.kwargs, node.outputs, node.attrs.replace(lowering=name), node.layer)
    return implementation(plain)


class TritonBuild:
    """Resolves transforms for ``generate`` and keeps the record of fallbacks."""

    def __init__(self) -> None:
        self.fallbacks: dict[str, str] = {}
        self._lock = threading.Lock()  # the module may run in several threads: one record and one warning per layer

    def fall_back(self, layer: str, reason: str) -> None:
        with self._lock:
            if layer in self.fallbacks:
                return
            self.fallbacks[layer] = reason
        warnings.warn(f"itnet: layer '{layer}' runs on the torch backend: {reason}", stacklevel=3)

    def resolve(self, node: Node) -> tuple[Callable[..., object], dict[str, object]]:
        name, opts = parse_lowering(node.attrs.lowering)
        ref, static = _torch_impl(node)
        # The fallback keeps the spec's options that the torch lowering takes too (chunked:chunk=32).
        ref_opts = {k: v for k, v in opts.items() if k in OPTIONS.get((node.family, name), set())}
        entry = KERNELS.get((node.family, name))
        if entry is None:  # the torch lowering is the call target itself: its options travel as static kwargs
            if name not in TORCH_BY_DESIGN:
                self.fall_back(node.layer, f"no Triton kernel for {node.family} lowering '{name}'")
            return ref, {**static, **ref_opts}
        ref = functools.partial(ref, **ref_opts) if ref_opts else ref
        kernel, check, known = entry(node)
        bad = set(opts) - known
        if bad:
            from ...errors import ItnetError

            raise ItnetError(f"unknown Triton option(s) {sorted(bad)} for '{name}'; known: {sorted(known)}",
                             layer=node.layer)  # fmt: skip
        torch_static = {k: v for k, v in static.items() if k not in opts}
        return self._guard(node.layer, kernel, check, ref, torch_static, opts), torch_static

    def _guard(self, layer, kernel, check, ref, torch_static, opts):
        build = self

        def run(*args, **kw):
            if layer not in build.fallbacks:
                reason = check(*args, **kw)
                if reason is None and not _can_launch(args):
                    reason = "no CUDA device and TRITON_INTERPRET is not set"
                if reason is None:
                    try:
                        return kernel(*args, **kw, **opts)
                    except Exception as e:  # compile and launch errors come in many types
                        reason = f"kernel failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
                build.fall_back(layer, reason)
            return ref(*args, **kw)

        run.__name__ = f"triton_{layer.replace('.', '_') or 'layer'}"
        return run


def _can_launch(args: tuple) -> bool:
    from ... import config

    t = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return t is not None and (t.is_cuda or config.triton_interpret())


def build_triton(prog: Program) -> ItnetModule:
    tb = TritonBuild()
    mod = ItnetModule(prog, generate(prog, tb.resolve))
    mod.fallbacks = tb.fallbacks
    prog.meta["fallbacks"] = tb.fallbacks
    return mod
