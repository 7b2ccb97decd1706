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

from ...errors import ItnetError
from ...ir.core import Node, Program
from ...ir.lowering import REGISTRY
from ...ir.target import TARGETS
from ..torch.codegen import ItnetModule, generate
from ..torch.registry import LOWERINGS, TORCH_TARGETS, implementation, spec_options
from ..torch.typecheck import check_program

# An entry takes the node and its typed spec options; it returns the kernel and a check (why these inputs are
# outside what the kernel takes, or None). Kernel modules are imported inside entries: registering needs no triton.
Entry = Callable[[Node, dict[str, object]], tuple[Callable[..., object], Callable[..., str | None]]]
KERNELS: dict[tuple[str, str], Entry] = {}
TARGET = TARGETS["triton"]
# Lowerings the Triton target hands to torch by design (vendor library, reference, cuFFT): not a fallback.
TORCH_BY_DESIGN = set(TARGET.delegates)
ATTENTION_TILES = ("block_m", "block_n", "num_warps", "num_stages", "bwd_block_m", "bwd_block_n")
CONV_TILES = ("block_c", "block_l", "num_warps", "block_m", "block_n", "block_k", "num_stages")
MC_ATTENTION_TILES = ("block_s", "block_r", "block_m", "num_warps")
HYBRID_TILES = ("block_s", "num_warps", "num_stages")
MC_CONV_TILES = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
LOWRANK_TILES = ("block_m", "block_n", "block_d", "split", "num_warps")
# the torch fused lowering's tiles (block_q, block_k) are accepted too, and ignored: a torch plan runs unchanged
MLP_TILES = ("block_m", "block_n", "num_warps", "bwd_block_m", "bwd_block_n", "bwd_num_warps", "block_q", "block_k")


def register(family: str, lowering: str, tiles: tuple[str, ...] = ()):
    """Register the Triton kernel of (family, lowering), with the tile options it reads beyond the record's."""

    def deco(fn: Entry) -> Entry:
        if (family, lowering) not in REGISTRY:
            raise ValueError(f"no lowering record for ({family}, {lowering}); register_lowering it first")
        KERNELS[(family, lowering)] = fn
        TARGET.add(family, lowering, tiles)
        return fn

    return deco


def _no_weights(node: Node, reason: str | None) -> str | None:
    return "the layer returns its attention weights" if node.attrs.return_weights else reason


@register("dot_exp", "fused", ATTENTION_TILES)
def _(node: Node, opts: dict[str, object]):
    from . import attention

    def check(q, k, v, mask=None, extras=None, sinks=None, **_: object) -> str | None:
        return _no_weights(node, None) or attention.supported(q, k, v, mask, extras, sinks)

    return attention.fused_attention, check


@register("stationary", "fused", CONV_TILES)
def _(node: Node, opts: dict[str, object]):
    from . import conv

    def check(x, weight, bias=None, **static: object) -> str | None:
        return conv.supported(x, weight, **static)

    return conv.stationary_conv, check


@register("ssm", "scan")
def _(node: Node, opts: dict[str, object]):
    from . import ssm

    def check(x, dt, A, B, C, *rest, **_: object) -> str | None:
        return ssm.supported(x, dt, A, B, C)

    return ssm.ssm_scan, check


@register("gated", "scan")
def _(node: Node, opts: dict[str, object]):
    from . import gated

    def check(x, weights, *rest, **static: object) -> str | None:
        return gated.supported(x, weights, **static)

    return gated.gated_scan, check


@register("ssm", "chunked")
def _(node: Node, opts: dict[str, object]):
    from . import ssd

    def check(x, dt, A, B, C, *rest, **_: object) -> str | None:
        return ssd.supported(x, dt, A, B, C)

    return ssd.ssd_chunked, check


@register("wkv", "scan")
def _(node: Node, opts: dict[str, object]):
    from . import wkv

    def check(k, v, w, u, **_: object) -> str | None:
        return wkv.supported(k, v, w, u)

    return wkv.wkv_scan, check


@register("wkv", "chunked")
def _(node: Node, opts: dict[str, object]):
    from . import wkv

    def check(k, v, w, u, **_: object) -> str | None:
        return wkv.supported(k, v, w, u)

    return wkv.wkv_chunked, check  # chunk arrives as a keyword: the spec's, or the record's default via torch's static


@register("dot_exp", "montecarlo", MC_ATTENTION_TILES)
def _(node: Node, opts: dict[str, object]):
    from . import montecarlo

    def check(q, k, v, mask=None, **_: object) -> str | None:
        return _no_weights(node, None) or montecarlo.supported(q, k, v, mask)

    return montecarlo.montecarlo_attention, check


@register("dot_exp", "hybrid", HYBRID_TILES)
def _(node: Node, opts: dict[str, object]):
    from . import hybrid

    def check(q, k, v, mask=None, **_: object) -> str | None:
        return _no_weights(node, None) or hybrid.supported(q, k, v, mask)

    return hybrid.hybrid_attention, check


@register("dot_exp", "lowrank", LOWRANK_TILES)
def _(node: Node, opts: dict[str, object]):
    from . import lowrank

    rank = int(opts.get("rank", REGISTRY[("dot_exp", "lowrank")].options().rank))  # type: ignore[attr-defined]

    def check(q, k, v, mask=None, **static: object) -> str | None:
        return lowrank.supported(q, k, v, mask, rank=rank, **static)

    return lowrank.attention_lowrank, check


@register("stationary", "lowrank", CONV_TILES)
def _(node: Node, opts: dict[str, object]):
    from . import conv_approx

    def check(x, weight, bias=None, **static: object) -> str | None:
        return conv_approx.lowrank_supported(x, weight, **static)

    return conv_approx.conv_lowrank, check


@register("stationary", "montecarlo", MC_CONV_TILES)
def _(node: Node, opts: dict[str, object]):
    from . import conv_approx

    mode = opts.get("mode", REGISTRY[("stationary", "montecarlo")].options().mode)  # type: ignore[attr-defined]

    def check(x, weight, bias=None, **static: object) -> str | None:
        return conv_approx.montecarlo_supported(x, weight, **{**static, "mode": mode})

    return conv_approx.conv_montecarlo, check


@register("mlp", "fused", MLP_TILES)
def _(node: Node, opts: dict[str, object]):
    from . import mlp

    def check(*args, **_: object) -> str | None:
        return mlp.supported(*args)

    return mlp.mlp_fused, check


def _torch_impl(node: Node) -> tuple[Callable[..., object], dict[str, object]]:
    """The torch implementation of the same lowering (options dropped), or the exact ``library`` one if torch has
    none: what a layer runs when its kernel cannot."""
    name = node.attrs.lowering.name
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
        spec = node.attrs.lowering
        family, name = node.family, spec.name
        if (family, name) not in REGISTRY:
            raise ItnetError(f"lowering '{name}' is not one of family {family}'s", layer=node.layer or None)
        entry = KERNELS.get((family, name))
        torch_tiles = TARGETS[TORCH_TARGETS[0]].tiles(family, name)
        tiles = TARGET.runs[(family, name)] if entry is not None else torch_tiles
        opts = spec_options(node, spec, tiles)
        ref, static = _torch_impl(node)
        # The fallback keeps the record's options and the torch tiles (chunked:chunk=32); Triton tiles are dropped.
        fields = set(vars(REGISTRY[(family, name)].options()))
        ref_opts = {k: v for k, v in opts.items() if k in fields or k in torch_tiles}
        ref_opts = ref_opts if (family, name) in LOWERINGS else {}
        if entry is None:  # the torch lowering is the call target itself: its options travel as static kwargs
            if not TARGET.delegated(family, name):
                self.fall_back(node.layer, f"no Triton kernel for {family} lowering '{name}'")
            return ref, {**static, **ref_opts}
        ref = functools.partial(ref, **ref_opts) if ref_opts else ref
        kernel, check = entry(node, opts)
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
    check_program(prog)  # declared types against what each op produces (a bundle may declare anything)
    tb = TritonBuild()
    mod = ItnetModule(prog, generate(prog, tb.resolve))
    mod.fallbacks = tb.fallbacks
    prog.meta["fallbacks"] = tb.fallbacks
    return mod
