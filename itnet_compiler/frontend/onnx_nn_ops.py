"""Convolution, pooling, normalisation and attention ops of the ONNX importer (see ``onnx_ops``). Conv and
ConvTranspose call torch's convolutions (recognised as ``stationary`` transforms); ``Attention`` calls SDPA where
its semantics are SDPA's (recognised as ``dot_exp``) and is written out otherwise (softcap, QK outputs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .onnx_ops import OPS, _t, op
from .onnx_shape_ops import unsupported


def _same_pads(n, in_sizes, kernel, strides, dilations) -> list[int]:
    """Begin pads then end pads for auto_pad SAME_UPPER / SAME_LOWER."""
    begin, end = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        lo = total // 2 if n.attr("auto_pad") == "SAME_UPPER" else total - total // 2
        begin.append(lo)
        end.append(total - lo)
    return begin + end


def _pads(n, x, kernel, strides, dilations) -> list[int]:
    dims = x.dim() - 2
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(n, list(x.shape[2:]), kernel, strides, dilations)
    if auto == "VALID":
        return [0] * (2 * dims)
    return list(n.attr("pads", [0] * (2 * dims)))


def _torch_pad(pads: list[int]) -> list[int]:
    half = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(half)):
        out += [pads[i], pads[i + half]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _geometry(n, x, w) -> tuple[int, list[int], list[int], list[int]]:
    """Spatial rank, kernel size, strides and dilations of a Conv / ConvTranspose node."""
    dims = x.dim() - 2
    return dims, list(w.shape[2:]), list(n.attr("strides", [1] * dims)), list(n.attr("dilations", [1] * dims))


@op("Conv")
def _conv(n, x, w, b=None):
    dims, kernel, strides, dil = _geometry(n, x, w)
    pads = _pads(n, x, kernel, strides, dil)
    half = len(pads) // 2
    if pads[:half] == pads[half:]:
        return _CONV[dims](x, w, _t(b) if b is not None else None, strides, pads[:half], dil, n.attr("group", 1))
    x = F.pad(x, _torch_pad(pads))
    return _CONV[dims](x, w, _t(b) if b is not None else None, strides, 0, dil, n.attr("group", 1))


@op("ConvTranspose")
def _convt(n, x, w, b=None):
    dims, kernel, strides, dil = _geometry(n, x, w)
    out_pad = list(n.attr("output_padding", [0] * dims))
    group = n.attr("group", 1)
    full = [
        (s - 1) * st + (k - 1) * d + 1 + op_
        for s, st, k, d, op_ in zip(x.shape[2:], strides, kernel, dil, out_pad, strict=True)
    ]
    shape = n.attr("output_shape")
    auto = n.attr("auto_pad", "NOTSET")
    if shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = (
            list(shape)[-dims:] if shape is not None else [s * st for s, st in zip(x.shape[2:], strides, strict=True)]
        )
        total = [f - wv for f, wv in zip(full, want, strict=True)]
        if auto == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:  # the ONNX rule: the larger half at the start
            begin = [t - t // 2 for t in total]
        pads = begin + [t - bg for t, bg in zip(total, begin, strict=True)]
    else:
        pads = list(n.attr("pads", [0] * (2 * dims))) if auto != "VALID" else [0] * (2 * dims)
    half = len(pads) // 2
    bias = _t(b) if b is not None else None
    if pads[:half] == pads[half:] and min(pads) >= 0:
        return _CONVT[dims](x, w, bias, strides, pads[:half], out_pad, group, dil)
    # Asymmetric pads crop the full output; a negative end pad (output_shape past it) grows it at the end.
    extra = [max(0, -e) for e in pads[half:]]
    y = _CONVT[dims](x, w, bias, strides, 0, [o + e for o, e in zip(out_pad, extra, strict=True)], group, dil)
    index = [slice(None), slice(None)]
    index += [
        slice(max(p, 0), f + e - max(q, 0)) for p, q, f, e in zip(pads[:half], pads[half:], full, extra, strict=True)
    ]
    return y[tuple(index)]


@op("BatchNormalization")
def _batchnorm(n, x, scale, bias, mean, var, *_):
    if n.attr("training_mode", 0):
        raise unsupported(n, "training_mode=1")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, n.attr("epsilon", 1e-5))


@op("InstanceNormalization")
def _instnorm(n, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.attr("epsilon", 1e-5))


@op("LayerNormalization")
def _layernorm(n, x, scale, bias=None):
    axis = n.attr("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, n.attr("epsilon", 1e-5))


@op("RMSNormalization")
def _rmsnorm(n, x, scale):
    axis = n.attr("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(dims, keepdim=True) + n.attr("epsilon", 1e-5))
    return y.to(x.dtype) * scale


@op("GroupNormalization")
def _groupnorm(n, x, scale, bias):
    groups, eps = n.attr("num_groups"), n.attr("epsilon", 1e-5)
    if scale.numel() == x.shape[1]:
        return F.group_norm(x, groups, scale, bias, eps)
    y = F.group_norm(x, groups, None, None, eps)  # opset 18: scale and bias per group
    c = x.shape[1] // groups
    shape = [1, -1] + [1] * (x.dim() - 2)
    return y * scale.repeat_interleave(c).reshape(shape) + bias.repeat_interleave(c).reshape(shape)


def _pool(kind: str):
    def run(n, x):
        dims = x.dim() - 2
        kernel = list(n.attr("kernel_shape"))
        strides = list(n.attr("strides", [1] * dims))
        dil = list(n.attr("dilations", [1] * dims))
        pads = _pads(n, x, kernel, strides, dil)
        half = len(pads) // 2
        ceil = bool(n.attr("ceil_mode", 0))
        if kind == "max":
            if pads[:half] != pads[half:]:
                x, pads = F.pad(x, _torch_pad(pads), value=-math.inf), [0] * (2 * dims)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
            return fn(x, kernel, strides, pads[:half], dil, ceil_mode=ceil)
        if dil != [1] * dims:
            raise unsupported(n, "dilated average pooling")
        include = bool(n.attr("count_include_pad", 0))
        if pads[:half] != pads[half:]:
            if not include:
                raise unsupported(n, "asymmetric pads without count_include_pad")
            x, pads = F.pad(x, _torch_pad(pads)), [0] * (2 * dims)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        return fn(x, kernel, strides, pads[:half], ceil_mode=ceil, count_include_pad=include)

    return run


OPS["MaxPool"] = _pool("max")
OPS["AveragePool"] = _pool("avg")
OPS["GlobalAveragePool"] = lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
OPS["GlobalMaxPool"] = lambda n, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ------------------------------------------------------------------------------------------------ Attention
def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H·D] -> [B, H, L, D]."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


@op("Attention")
def _attention(n, q, k, v, mask=None, past_k=None, past_v=None, nonpad=None):
    if n.attr("left_window_size", -1) >= 0 or n.attr("right_window_size", -1) >= 0:
        raise unsupported(n, "a sliding window (left/right_window_size)")
    three = q.dim() == 3
    if three:
        q, k, v = _heads(q, n.attr("q_num_heads")), _heads(k, n.attr("kv_num_heads")), _heads(v, n.attr("kv_num_heads"))
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    present = (k, v)
    lq, lk = q.shape[2], k.shape[2]
    scale = n.attr("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    causal = bool(n.attr("is_causal", 0))
    softcap = float(n.attr("softcap", 0.0) or 0.0)
    mode = n.attr("qk_matmul_output_mode", 0)
    want_qk = len([o for o in n.outputs[3:4] if o]) > 0
    if mask is not None and mask.shape[-1] != lk:  # a mask shorter than the keys leaves the rest masked
        fill = False if mask.dtype == torch.bool else -math.inf
        mask = F.pad(mask, (0, lk - mask.shape[-1]), value=fill)
    offset = past_k.shape[2] if past_k is not None else 0
    cols = torch.arange(lk)
    if nonpad is not None:  # an external cache: keys at and past nonpad_kv_seqlen[b] are padding
        valid = (cols[None, :] < nonpad.long()[:, None])[:, None, None, :]
        if mask is None:
            mask = valid
        elif mask.dtype == torch.bool:
            mask = mask & valid
        else:
            mask = mask.masked_fill(~valid, -math.inf)
        if causal:
            ahead = nonpad.long()[:, None, None, None] - lq  # per batch: the queries end where the keys do
            keep = cols[None, None, None, :] <= torch.arange(lq)[None, None, :, None] + ahead
            mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, -math.inf)
            causal = False
    if causal:
        keep = cols[None, :] <= torch.arange(lq)[:, None] + offset
        if mask is None:
            mask = keep if offset else None
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, -math.inf)
    gqa = q.shape[1] != k.shape[1]
    if not softcap and not want_qk:
        is_causal = causal and offset == 0 and mask is None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        if mask is not None:  # a row that admits no key is 0 (ONNX), where SDPA gives NaN
            dead = (
                ~mask.any(-1, keepdim=True) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1, keepdim=True)
            )
            y = y.masked_fill(dead, 0.0)
    else:
        if gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = torch.matmul(q * math.sqrt(scale), (k * math.sqrt(scale)).transpose(-1, -2))
        if softcap:  # ONNX caps before the bias is added
            s = softcap * torch.tanh(s / softcap)
        qk = [s, s]
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
        qk.append(s)
        top = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isneginf(top), torch.zeros_like(top), top))
        tot = p.sum(-1, keepdim=True)
        p = p / torch.where(tot == 0, torch.ones_like(tot), tot)
        qk.append(p)
        y = torch.matmul(p, v)
        qk_out = qk[mode]
    if three:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    outs = [y, *present]
    if want_qk:
        outs.append(qk_out)
    return tuple(outs)
