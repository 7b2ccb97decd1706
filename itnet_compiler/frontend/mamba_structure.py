"""Mamba-style mixers recognised by structure, whatever their class is called (FalconMamba's and Jamba's mixers, a
user's renamed copy): the predicates behind the structural converters of ``builtin_converters``.

A module is a Mamba (selective-scan) mixer when it holds exactly A_log [D, N] and D [D], a causal depthwise conv1d over
D channels, in_proj (hidden → 2D), x_proj (D → R + 2N, no bias), dt_proj (R → D), out_proj (D → hidden), the size
attributes the converter reads (``intermediate_size``, ``ssm_state_size``, ``time_step_rank``, ``activation``) agreeing
with those shapes, and optionally RMS norms on dt, B and C (``dt_layernorm``, ``b_layernorm``, ``c_layernorm``:
FalconMamba's without weight, Jamba's with). A Mamba2 (SSD) mixer holds A_log, D and dt_bias [H], a causal depthwise
conv1d over D + 2GN channels, in_proj (hidden → 2D + 2GN + H), a gated grouped RMS norm and out_proj.

Anything else is refused, so the module is traced instead of converted wrongly: another submodule or parameter (its
forward might use it), a forward taking other arguments (``seq_idx``, ...), a norm that is not an RMS norm. Norms are
probed: called on random inputs (with a random weight put in through ``torch.func.functional_call``, so the module is
never changed) and compared with the RMS formula with and without that weight, at two scales so that eps shows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# The mixers' activation names (``config.hidden_act``) and the ATen op of each.
ACTIVATIONS = {"silu": "aten.silu.default", "swish": "aten.silu.default", "gelu": "aten.gelu.default"}
ACTIVATIONS["relu"] = "aten.relu.default"
MAMBA_NORMS = ("dt_layernorm", "b_layernorm", "c_layernorm")
_MAMBA_CHILDREN = frozenset({"in_proj", "conv1d", "x_proj", "dt_proj", "out_proj", "act", *MAMBA_NORMS})
_MAMBA2_CHILDREN = frozenset({"in_proj", "conv1d", "norm", "out_proj", "act"})
# The forward's parameters a converter may meet: the input, the padding mask, caches (refused when given), **kwargs.
_CALL = frozenset({"hidden_states", "attention_mask", "cache", "cache_params", "cache_position", "inference_params"})


@dataclass(frozen=True)
class RmsNorm:
    """x · rsqrt(mean(x², last axis of ``group`` channels) + eps) in float32, times ``weight`` when weighted."""

    eps: float
    weighted: bool
    group: int | None = None


def _linear(m: object, n_in: int, n_out: int, bias: bool | None = None) -> bool:
    if not isinstance(m, nn.Linear) or (m.in_features, m.out_features) != (n_in, n_out):
        return False
    return bias is None or (m.bias is not None) == bias


def _causal_depthwise(m: object, channels: int) -> bool:
    if not isinstance(m, nn.Conv1d) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        return False
    k = m.kernel_size[0]
    geometry = (m.in_channels, m.out_channels, m.groups, m.stride, m.dilation, m.padding)
    return geometry == (channels, channels, channels, (1,), (1,), (k - 1,))


def _int(m: nn.Module, name: str) -> int | None:
    v = getattr(m, name, None)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _holds_only(m: nn.Module, children: frozenset[str], params: set[str]) -> bool:
    """The module's own parameters and buffers are ``params``; its children are among ``children``, and ``act``, if
    there, holds no weights."""
    own = {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}
    names = {n for n, _ in m.named_children()}
    act = getattr(m, "act", None)
    if "act" in names and any(True for _ in [*act.parameters(), *act.buffers()]):
        return False
    return own == params and names <= children


def _call_ok(m: nn.Module) -> bool:
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    named = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return bool(named) and named[0] == "hidden_states" and set(named) <= _CALL


def _params(m: nn.Module, *names: str, dims: tuple[int, ...]) -> list[torch.Tensor] | None:
    out = [getattr(m, n, None) for n in names]
    ok = all(isinstance(p, nn.Parameter) and p.dim() == d for p, d in zip(out, dims, strict=True))
    return out if ok else None


def probe_rms_norm(norm: object, size: int, gated: bool = False) -> RmsNorm | None:
    """What ``norm`` computes on [*, size] inputs (``norm(x, gate)`` when gated, with x · silu(gate) normalised in
    groups of ``norm.group_size``), or None when it is no RMS norm."""
    if not isinstance(norm, nn.Module):
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    group = (_int(norm, "group_size") or size) if gated else size
    if not isinstance(eps, float) or size % group:
        return None
    g = torch.Generator().manual_seed(0)
    w = torch.rand(size, generator=g) + 0.5
    has_weight = isinstance(getattr(norm, "weight", None), torch.Tensor)
    found: set[bool] = set()
    for scale in (1.0, 1e-3):
        x, z = (scale * torch.randn(3, size, generator=g) for _ in range(2))
        args = (x, z) if gated else (x,)
        try:
            with torch.no_grad():
                y = functional_call(norm, {"weight": w}, args) if has_weight else norm(*args)
        except Exception:  # a module that does not run on a [3, size] probe is not a norm of that size
            return None
        h = (x * F.silu(z) if gated else x).unflatten(-1, (size // group, group))
        ref = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
        if not isinstance(y, torch.Tensor) or y.shape != ref.shape:
            return None
        matches = {flag for flag, want in ((False, ref), (True, w * ref)) if torch.allclose(y, want, 1e-4, 1e-6)}
        if len(matches) != 1 or (True in matches and not has_weight):
            return None
        found |= matches
    if len(found) != 1:
        return None
    weighted = found.pop()
    if weighted and tuple(norm.weight.shape) != (size,):
        return None
    return RmsNorm(eps, weighted, group if gated else None)


def mamba_norms(m: nn.Module) -> dict[str, RmsNorm] | None:
    """The dt / B / C norms of a Mamba (selective-scan) mixer (empty for Mamba's own), or None when ``m`` is not
    one that the Mamba converter computes exactly."""
    found = _params(m, "A_log", "D", dims=(2, 1))
    if found is None:
        return None
    inner, n = found[0].shape
    rank = _int(m, "time_step_rank")
    in_proj = getattr(m, "in_proj", None)
    if rank is None or (_int(m, "intermediate_size"), _int(m, "ssm_state_size")) != (inner, n):
        return None
    if str(getattr(m, "activation", None)) not in ACTIVATIONS or not isinstance(in_proj, nn.Linear):
        return None
    hidden = in_proj.in_features
    shapes_ok = found[1].shape == (inner,) and _linear(in_proj, hidden, 2 * inner)
    shapes_ok = shapes_ok and _linear(getattr(m, "x_proj", None), inner, rank + 2 * n, bias=False)
    shapes_ok = shapes_ok and _linear(getattr(m, "dt_proj", None), rank, inner)
    shapes_ok = shapes_ok and _linear(getattr(m, "out_proj", None), inner, hidden)
    shapes_ok = shapes_ok and _causal_depthwise(getattr(m, "conv1d", None), inner)
    if not (shapes_ok and _holds_only(m, _MAMBA_CHILDREN, {"A_log", "D"}) and _call_ok(m)):
        return None
    norms: dict[str, RmsNorm] = {}
    for name, size in zip(MAMBA_NORMS, (rank, n, n), strict=True):
        if getattr(m, name, None) is None:
            continue
        norm = probe_rms_norm(getattr(m, name), size)
        if norm is None:
            return None
        norms[name] = norm
    return norms


def is_mamba_mixer(m: nn.Module) -> bool:
    return mamba_norms(m) is not None


def is_mamba2_mixer(m: nn.Module) -> bool:
    """A Mamba2 (SSD) mixer that the Mamba2 converter computes exactly."""
    found = _params(m, "A_log", "D", "dt_bias", dims=(1, 1, 1))
    if found is None:
        return False
    inner, heads, groups = _int(m, "intermediate_size"), _int(m, "num_heads"), _int(m, "n_groups")
    n, head_dim, chunk = _int(m, "ssm_state_size"), _int(m, "head_dim"), _int(m, "chunk_size")
    in_proj = getattr(m, "in_proj", None)
    if None in (inner, heads, groups, n, head_dim, chunk) or not isinstance(in_proj, nn.Linear):
        return False
    if heads * head_dim != inner or groups < 1 or heads % groups or chunk < 1 or str(m.activation) not in ACTIVATIONS:
        return False
    limit = getattr(m, "time_step_limit", (0.0, float("inf")))
    if not (isinstance(limit, (tuple, list)) and len(limit) == 2 and all(isinstance(v, (int, float)) for v in limit)):
        return False
    conv_dim, hidden = inner + 2 * groups * n, in_proj.in_features
    shapes_ok = all(p.shape == (heads,) for p in found) and _linear(in_proj, hidden, inner + conv_dim + heads)
    shapes_ok = shapes_ok and _linear(getattr(m, "out_proj", None), inner, hidden)
    shapes_ok = shapes_ok and _causal_depthwise(getattr(m, "conv1d", None), conv_dim)
    if not (shapes_ok and _holds_only(m, _MAMBA2_CHILDREN, {"A_log", "D", "dt_bias"}) and _call_ok(m)):
        return False
    norm = probe_rms_norm(getattr(m, "norm", None), inner, gated=True)
    return norm is not None and norm.weighted
