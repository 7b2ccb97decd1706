"""Triton lowering of ``dot_exp``: fused forward and backward kernels rendered from ``templates.ATTENTION``.

Masks become an additive bias read through broadcast strides (a bool mask turns into 0 / -inf); GQA reads K/V at
head h // group and sums dK, dV over each group; causal and window(r) supports shorten the loops (whole tiles above
the diagonal or below the window are never visited), and ``live_tiles`` tables let every kernel, forward and
backward, skip tiles a mask rules out entirely. Head dims up to 256 are padded to a power of two. Tuning values are
the constexpr fields of ``AttentionOptions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from ...ir import score_mod as sm
from . import loader, score_mod, templates

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionOptions:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    bwd_block_m: int = 64
    bwd_block_n: int = 64
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2

    @staticmethod
    def default(d: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> AttentionOptions:
        """Measured on an H200 (bench/gpu.py); large head dims and fp32 get smaller tiles to fit shared memory."""
        if device.type != "cuda":  # interpreter: small tiles keep numpy fast
            return AttentionOptions(16, 16, 1, 1, 16, 16, 1, 1)
        wide = dtype == torch.float32
        if d <= 64:
            return AttentionOptions(128, 64, 4, 3, 64, 64, 4, 2)
        if d <= 128 and not wide:
            return AttentionOptions(128, 64, 8, 3, 64, 64, 4, 2)
        if d <= 128:
            return AttentionOptions(64, 64, 4, 2, 32, 64, 4, 2)
        if not wide:
            return AttentionOptions(64, 32, 4, 2, 32, 32, 4, 1)
        return AttentionOptions(32, 32, 4, 1, 16, 32, 4, 1)

    def with_overrides(self, **kw: int) -> AttentionOptions:
        return replace(self, **{k: int(v) for k, v in kw.items() if v is not None})


def kernels(mod: score_mod.ModSpec | None = None):
    """The rendered module for the dot_exp family (one source for fwd, dQ and dK/dV), with the node's score
    modification inlined when it has one."""
    title = "dot_exp fused attention" + (f", score {mod.text}" if mod is not None else "")
    holes = {"TITLE": title, **score_mod.holes(mod, templates.DOT_EXP_KERNEL)}
    source = loader.render(templates.ATTENTION, holes)
    return loader.load("dot_exp_fused", source)


def _extras(extras, shape: tuple[int, ...]) -> tuple[list[object], list[torch.Tensor]]:
    """Each extra expanded (zero strides) to [B, H, L_q, L_k], as kernel arguments: pointer and 4 strides."""
    args: list[object] = []
    views = []
    for t in extras:
        t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(shape)
        views.append(t4)
        args += [t4, *t4.stride()]
    return args, views


def _bias(mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, tuple, int]:
    """The mask as the kernel reads it, its broadcast strides, and HAS_BIAS: 0 none, 1 additive, 2 boolean (read
    in place, 1 byte per pair: no float copy of an N² mask on every call)."""
    if mask is None:
        return torch.empty(1, device=device, dtype=torch.float32), (0, 0, 0, 0), 0
    kind = 2 if mask.dtype == torch.bool else 1
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(shape)
    return mask, tuple(mask.stride()), kind


def live_tiles(mask: torch.Tensor | None, shape: tuple[int, int, int, int], bm: int, bn: int) -> torch.Tensor | None:
    """Block sparsity: int8 [B|1, H|1, tiles_m, tiles_n] (broadcast through zero strides), 0 where the mask rules out
    every pair of a (row tile, column tile); None without a mask. One reduction over the mask, no host sync: a table
    that skips nothing costs the kernel one byte per tile."""
    if mask is None:
        return None
    b, h, lq, lk = shape
    live = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    while live.dim() < 4:
        live = live.unsqueeze(0)
    rows, cols = live.shape[-2], live.shape[-1]
    pr = (-rows) % bm if rows == lq else 0
    pc = (-cols) % bn if cols == lk else 0
    if pr or pc:
        live = torch.nn.functional.pad(live, (0, pc, 0, pr), value=False)
    tm = live.shape[-2] // bm if rows == lq else 1
    tn = live.shape[-1] // bn if cols == lk else 1
    live = live.reshape(*live.shape[:2], tm, live.shape[-2] // tm, tn, live.shape[-1] // tn).any(5).any(3)
    return live.to(torch.int8).expand(b, h, triton.cdiv(lq, bm), triton.cdiv(lk, bn))  # size-1 dims: stride 0


def _smaller(opts: AttentionOptions) -> AttentionOptions | None:
    """The next configuration to try after the card ran out of shared memory or registers."""
    if opts.num_stages > 1 or opts.bwd_num_stages > 1:
        return replace(opts, num_stages=max(1, opts.num_stages - 1), bwd_num_stages=max(1, opts.bwd_num_stages - 1))
    if opts.block_n > 16 or opts.bwd_block_n > 16:
        return replace(opts, block_n=max(16, opts.block_n // 2), bwd_block_n=max(16, opts.bwd_block_n // 2))
    if opts.block_m > 16 or opts.bwd_block_m > 16:
        return replace(opts, block_m=max(16, opts.block_m // 2), bwd_block_m=max(16, opts.bwd_block_m // 2))
    return None


def shrinking(fn):
    """Run ``fn(opts)``; on an out-of-resources launch failure retry with smaller tiles (same answer, less memory)."""

    def run(opts):
        while True:
            try:
                return fn(opts), opts
            except triton.runtime.errors.OutOfResources:
                nxt = _smaller(opts)
                if nxt is None:
                    raise
                opts = nxt

    return run


def _table(blocks: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The block table and its strides as kernel arguments (a dummy the kernel never reads when there is none)."""
    return (blocks, tuple(blocks.stride())) if blocks is not None else (like, (0, 0, 0, 0))


def forward(
    q, k, v, mask, scale: float, causal: bool, window: int, opts: AttentionOptions, spec=None, extras=(), sinks=None
):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    group = h // k.shape[1]
    bias, bs, kind = _bias(mask, (b, h, lq, lk), q.device)
    o = torch.empty(b, h, lq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(2, b * h, lq, dtype=torch.float32, device=q.device)  # row max, log2 of row sum
    mod = kernels(spec)
    xargs, _ = _extras(extras, (b, h, lq, lk))
    qk_scale = scale if spec is not None else scale * LOG2E  # a score expression reads the natural-unit score
    grid = (triton.cdiv(lq, opts.block_m), b * h)
    blocks = live_tiles(mask, (b, h, lq, lk), opts.block_m, opts.block_n)
    blk, bst = _table(blocks, lse)
    mod.attention_fwd[grid](
        q, k, v, bias, o, lse, blk, *bst, *q.stride(), *k.stride(), *v.stride(), *bs, *o.stride(),
        h, group, lq, lk, d, qk_scale, window, sinks if sinks is not None else lse, *xargs,
        HAS_BIAS=kind, CAUSAL=causal, PREC=loader.dot_precision(q.dtype), HAS_BLOCKS=blocks is not None,
        WINDOWED=window > 0, HAS_SINK=sinks is not None, BLOCK_M=opts.block_m, BLOCK_N=opts.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=opts.num_warps, num_stages=opts.num_stages,
    )  # fmt: skip
    return o, lse, bias, bs


def backward(
    do,
    q,
    k,
    v,
    o,
    lse,
    mask,
    bias,
    bs,
    scale: float,
    causal: bool,
    window: int,
    opts: AttentionOptions,
    spec=None,
    extras=(),
):
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = h // hkv
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).reshape(b * h, lq)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, h, lk, d, dtype=k.dtype, device=k.device)
    dv = torch.empty(b, h, lk, d, dtype=v.dtype, device=v.device)
    mod = kernels(spec)
    xargs, _ = _extras(extras, (b, h, lq, lk))
    qk_scale = scale if spec is not None else scale * LOG2E
    dts = [torch.zeros(b, h, lq, lk, device=q.device, dtype=torch.float32) if need else None
           for need in (spec.grads if spec is not None else ())]  # fmt: skip
    gargs = [a for t in dts if t is not None for a in (t, *t.stride())]
    blocks = live_tiles(mask, (b, h, lq, lk), opts.bwd_block_m, opts.bwd_block_n)
    blk, bst = _table(blocks, lse)
    kind = 0 if mask is None else 2 if mask.dtype == torch.bool else 1
    common = dict(HAS_BIAS=kind, CAUSAL=causal, PREC=loader.dot_precision(q.dtype), HAS_BLOCKS=blocks is not None,
                  WINDOWED=window > 0, BLOCK_M=opts.bwd_block_m, BLOCK_N=opts.bwd_block_n,
                  BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=opts.bwd_num_warps,
                  num_stages=opts.bwd_num_stages)  # fmt: skip
    mod.attention_bwd_dq[(triton.cdiv(lq, opts.bwd_block_m), b * h)](
        q, k, v, bias, do, lse, delta, dq, blk, *bst, *q.stride(), *k.stride(), *v.stride(), *bs, *do.stride(),
        *dq.stride(), h, group, lq, lk, d, qk_scale, scale, window, *xargs, *gargs, **common,
    )  # fmt: skip
    mod.attention_bwd_dkdv[(triton.cdiv(lk, opts.bwd_block_n), b * h)](
        q, k, v, bias, do, lse, delta, dk, dv, blk, *bst, *q.stride(), *k.stride(), *v.stride(), *bs, *do.stride(),
        *dk.stride(), h, group, lq, lk, d, qk_scale, scale, window, *xargs, **common,
    )  # fmt: skip
    if group > 1:
        dk = dk.view(b, hkv, group, lk, d).sum(2)
        dv = dv.view(b, hkv, group, lk, d).sum(2)
    dextras = [None if g is None else _reduce(g, t) for g, t in zip(dts, extras, strict=True)]
    return dq, dk, dv, dextras, delta


def _reduce(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An extra's gradient from the full [B, H, L_q, L_k] one: summed over the dims it broadcast along."""
    padded = (1,) * (4 - t.dim()) + tuple(t.shape)
    return g.sum_to_size(padded).reshape(t.shape).to(t.dtype)


def _sink_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """d loss / d sink_h = -Σ_{b,i} p_sink(b, h, i)·delta(b, h, i): the sink's softmax weight times the row's
    (dO·O) (its value is 0), with p_sink = exp2(sink·log2e - m_i - log2 l_i) from the forward's two LSE planes."""
    m, lg = lse[0].view(b, h, -1), lse[1].view(b, h, -1)
    p = torch.exp2(sinks.float().view(1, h, 1) * LOG2E - m - lg)
    return -(p * delta.view(b, h, -1)).sum((0, 2)).to(sinks.dtype)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal, window, opts, text, sinks, *extras):
        spec = None
        if text:
            booleans = tuple(t.dtype == torch.bool for t in extras)
            spec = score_mod.ModSpec(text, booleans, tuple(t.requires_grad for t in extras))

        def run(op):
            return forward(q, k, v, mask, scale, causal, window, op, spec, extras, sinks)

        (o, lse, bias, bs), opts = shrinking(run)(opts)
        ctx.save_for_backward(q, k, v, o, lse, mask, bias, sinks, *extras)
        ctx.meta = (bs, scale, causal, window, opts, spec)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask, bias, sinks, *extras = ctx.saved_tensors
        bs, scale, causal, window, opts, spec = ctx.meta

        def run(op):
            return backward(do, q, k, v, o, lse, mask, bias, bs, scale, causal, window, op, spec, extras)

        (dq, dk, dv, dextras, delta), _ = shrinking(run)(opts)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[9]:
            dsinks = _sink_grad(sinks, lse, delta, q.shape[0], q.shape[1])
        return dq, dk, dv, None, None, None, None, None, None, dsinks, *dextras


GRID_Y = 65535  # the most programs a launch grid's second axis (batch · heads in every dot_exp kernel) takes on CUDA
INDEX_LIMIT = 2**31  # offsets inside one (batch, head) slice are 32-bit (the slices' bases are 64-bit)


def layout_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """The layout checks of the dot_exp kernels that read K/V per query head from [batch, heads, rows, dim] inputs,
    one (batch, head) per program row (montecarlo, lowrank); None when the layout fits."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"ranks {q.dim()}, {k.dim()}, {v.dim()} of q, k, v (the kernels take [batch, heads, rows, dim])"
    if k.shape[:2] != v.shape[:2] or k.shape[0] != q.shape[0] or q.shape[1] % k.shape[1]:
        return "key/value batch or heads that do not match the query's (the kernels index them per query head)"
    if q.shape[0] * q.shape[1] > GRID_Y:
        return f"batch × heads above {GRID_Y} (the launch grid's second axis)"
    return None


def operand_reason(q: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """The head-dim, mask and dtype limits every dot_exp kernel shares; None when the operands fit."""
    if q.shape[-1] != v.shape[-1]:
        return "value head dim differs from query head dim"
    if q.shape[-1] > 256:
        return "head dim above 256"
    if mask is not None and mask.requires_grad:
        return "the additive mask needs a gradient"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    return None


def supported(q, k, v, mask=None, extras=(), sinks=None) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    if _trained_bias(mask):  # read as one more extra (``fused_attention``), which gets its gradient
        if len(extras or ()) >= sm.MAX_EXTRAS:
            return f"an additive mask that needs a gradient beside {sm.MAX_EXTRAS} extras"
        mask = None
    reason = operand_reason(q, v, mask)
    if reason is not None:
        return reason
    for n, t in enumerate(extras or ()):
        if t.dtype not in (torch.bool, torch.float32, torch.float16, torch.bfloat16) or t.dim() > 4:
            return f"extras[{n}] of dtype {t.dtype} and rank {t.dim()} (the kernels read float or bool, rank <= 4)"
    if q.shape[0] * q.shape[1] > GRID_Y:
        return f"batch × heads above {GRID_Y} (the kernels' grid axis)"
    return None


def fused_attention(
    q, k, v, mask=None, extras=None, sinks=None, *, scale, causal, return_weights=False, window=0, score_mod="",
    **overrides,
):  # fmt: skip
    """The Triton implementation of ``dot_exp`` with the same contract as the torch lowerings. An additive mask that
    needs a gradient (a learned position bias: T5, LongT5) is added by the score expression instead, as one more
    extra, so the dQ kernel writes its gradient."""
    if _trained_bias(mask):
        extras = [*(extras or ()), mask]
        term = f"t{len(extras) - 1}"
        score_mod, mask = (f"({score_mod}) + {term}" if score_mod else f"s + {term}"), None
    opts = AttentionOptions.default(q.shape[-1], q.device, q.dtype).with_overrides(**overrides)
    return _FusedAttention.apply(q, k, v, mask, scale, causal, int(window), opts, score_mod, sinks, *(extras or ()))


def _trained_bias(mask: torch.Tensor | None) -> bool:
    return mask is not None and mask.dtype != torch.bool and mask.requires_grad


def flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool) -> float:
    f = 4.0 * b * h * lq * lk * d
    return f / 2 if causal else f


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
