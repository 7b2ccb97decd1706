"""ONNX LSTM / GRU / RNN nodes as ``gated`` transforms. The node's weights (initializers or graph inputs alike) are
turned into torch's layout by generic ops — ONNX gate blocks (LSTM i o f c, GRU z r h) reordered to torch's (i f g o,
r z n), W / R / B split per direction — and handed to ``GatedCall``, a module whose converter emits the transform
with those values as its weights; an RNN whose directions all use Tanh (or all Relu) is torch's ``rnn_tanh``
(``rnn_relu``) cell. ``direction="reverse"`` runs forward on the time-flipped sequence. Variants torch's cells do not
compute (peepholes, clip, other or mixed activations, GRU with linear_before_reset=0, sequence_lens) run as an
explicit loop over time (``Unrolled``): correct, but generic ops at a static length."""

from __future__ import annotations

import torch
from torch import nn

from ..ir.recurrent import GatedAttrs
from ..ir.types import TensorType
from .builtin_converters import _register, bind_inputs
from .converters import ConverterContext

_TO_TORCH = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}  # torch block k is ONNX block _TO_TORCH[k]
_DEFAULT_ACT = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class GatedCall(nn.Module):
    """torch's fused LSTM / GRU / RNN on weights passed as tensors (torch's ``_flat_weights`` order); ``cell`` is a
    ``gated`` cell name."""

    def __init__(self, cell: str, input_size: int, hidden: int, bidirectional: bool, bias: bool):
        super().__init__()
        self.cell, self.input_size, self.hidden = cell, input_size, hidden
        self.bidirectional, self.bias = bidirectional, bias

    def forward(self, x: torch.Tensor, weights: list[torch.Tensor], h0: torch.Tensor, c0: torch.Tensor | None = None):
        flags = (self.bias, 1, 0.0, False, self.bidirectional, False)
        if self.cell == "lstm":
            y, h, c = torch.lstm(x, (h0, c0), list(weights), *flags)
            return y, h, c
        y, h = getattr(torch, self.cell)(x, h0, list(weights), *flags)
        return y, h


def _shapes(module: GatedCall, x, weights, h0, c0=None):
    dirs = 2 if module.bidirectional else 1
    y = x.new_empty(x.shape[0], x.shape[1], dirs * module.hidden)
    h = x.new_empty(dirs, x.shape[1], module.hidden)
    return (y, h, x.new_empty(dirs, x.shape[1], module.hidden)) if module.cell == "lstm" else (y, h)


def _convert(ctx: ConverterContext, module: GatedCall, *inputs):
    args = bind_inputs(ctx, module, inputs)
    roles = {"x": args["x"], "weights": list(args["weights"]), "h0": args["h0"]}
    if module.cell == "lstm":
        roles["c0"] = args["c0"]
    attrs = GatedAttrs(
        cell=module.cell,
        input_size=module.input_size,
        hidden_size=module.hidden,
        num_layers=1,
        bidirectional=module.bidirectional,
        bias=module.bias,
        support="full" if module.bidirectional else "causal",
    )
    return ctx.transform(attrs, roles, [t for t in ctx.output_types if isinstance(t, TensorType)])


_register(GatedCall, _shapes)(_convert)


def _activations(node) -> list[str]:
    return [a.decode() if isinstance(a, bytes) else a for a in (node.attr("activations") or [])]


def _rnn_cell(node) -> str | None:
    """``rnn_tanh`` / ``rnn_relu`` for an RNN node whose every direction uses that activation (one name per
    direction, or none: Tanh), else None."""
    acts = _activations(node) or ["Tanh"] * (2 if node.attr("direction", "forward") == "bidirectional" else 1)
    dirs = 2 if node.attr("direction", "forward") == "bidirectional" else 1
    if len(acts) != dirs or len(set(acts)) != 1 or acts[0] not in ("Tanh", "Relu"):
        return None
    return f"rnn_{acts[0].lower()}"


def _blocks(w: torch.Tensor, op_type: str) -> torch.Tensor:
    parts = torch.chunk(w, len(_TO_TORCH[op_type]), dim=0)
    return torch.cat([parts[i] for i in _TO_TORCH[op_type]], 0)


class OnnxRecurrent(nn.Module):
    """One ONNX LSTM / GRU / RNN node computed by torch's cell (captured as a ``gated`` transform)."""

    def __init__(self, node, input_size: int):
        super().__init__()
        self.op_type = node.op_type
        self.hidden = int(node.attr("hidden_size"))
        self.direction = node.attr("direction", "forward")
        self.layout = int(node.attr("layout", 0))
        bias = len(node.inputs) > 3 and bool(node.inputs[3])
        cell = _rnn_cell(node) if self.op_type == "RNN" else self.op_type.lower()
        self.call = GatedCall(cell, input_size, self.hidden, self.direction == "bidirectional", bias)

    def forward(self, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
        if self.layout:
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
            c0 = c0.transpose(0, 1) if c0 is not None else None
        dirs, hid = w.shape[0], self.hidden
        g = len(_TO_TORCH[self.op_type])
        weights = []
        for d in range(dirs):
            weights += [_blocks(w[d], self.op_type), _blocks(r[d], self.op_type)]
            if b is not None:
                weights += [_blocks(b[d, : g * hid], self.op_type), _blocks(b[d, g * hid :], self.op_type)]
        if h0 is None:
            h0 = x.new_zeros(dirs, x.shape[1], hid)
        if self.op_type == "LSTM" and c0 is None:
            c0 = x.new_zeros(dirs, x.shape[1], hid)
        rev = self.direction == "reverse"
        xs = torch.flip(x, [0]) if rev else x
        out = self.call(xs, weights, h0, c0) if self.op_type == "LSTM" else self.call(xs, weights, h0)
        y = torch.flip(out[0], [0]) if rev else out[0]
        y = y.reshape(y.shape[0], y.shape[1], dirs, hid).permute(0, 2, 1, 3)  # [L, dirs, B, H]
        states = list(out[1:])
        if self.layout:
            y = y.permute(2, 0, 1, 3)
            states = [s.transpose(0, 1) for s in states]
        return (y, *states)


def fused_variant(node) -> bool:
    """Whether torch's cell computes this node exactly."""
    if node.op_type == "RNN":
        if _rnn_cell(node) is None:
            return False
    elif _activations(node) not in ([], _DEFAULT_ACT.get(node.op_type)):
        return False
    if node.attr("clip") is not None or node.attr("input_forget", 0):
        return False
    if node.op_type == "GRU" and not node.attr("linear_before_reset", 0):
        return False
    optional = node.inputs[4:5] + node.inputs[7:8]  # sequence_lens, peepholes
    return node.op_type in _TO_TORCH and not any(optional)


class Unrolled(nn.Module):
    """The ONNX recurrence definition, step by step (every variant; generic ops at a static length)."""

    def __init__(self, node, input_size: int | None = None):
        super().__init__()
        self.op_type = node.op_type
        self.hidden = int(node.attr("hidden_size"))
        self.direction = node.attr("direction", "forward")
        self.layout = int(node.attr("layout", 0))
        self.clip = node.attr("clip")
        self.lbr = int(node.attr("linear_before_reset", 0))
        self.acts = _activations(node)
        self.input_forget = int(node.attr("input_forget", 0))

    def _act(self, i: int, d: int, x):
        names = self.acts[d * len(_DEFAULT_ACT[self.op_type]) :] if self.acts else _DEFAULT_ACT[self.op_type]
        name = names[i] if i < len(names) else _DEFAULT_ACT[self.op_type][i]
        return {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}[name](x)

    def forward(self, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
        if self.layout:
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
            c0 = c0.transpose(0, 1) if c0 is not None else None
        dirs, hid, steps, batch = w.shape[0], self.hidden, x.shape[0], x.shape[1]
        gates = w.shape[1] // hid
        ys, hs, cs = [], [], []
        for d in range(dirs):
            h = h0[d] if h0 is not None else x.new_zeros(batch, hid)
            c = c0[d] if c0 is not None else x.new_zeros(batch, hid)
            wb = b[d, : gates * hid] if b is not None else x.new_zeros(gates * hid)
            rb = b[d, gates * hid :] if b is not None else x.new_zeros(gates * hid)
            reverse = self.direction == "reverse" or d == 1
            out = [None] * steps
            for t in reversed(range(steps)) if reverse else range(steps):
                live = None if seq_lens is None else (t < seq_lens)[:, None]
                xt = x[t] @ w[d].T + wb
                if self.op_type == "LSTM":
                    z = xt + h @ r[d].T + rb
                    i, o, f, cc = torch.chunk(z, 4, -1)
                    if p is not None:
                        i, f = i + p[d, :hid] * c, f + p[d, 2 * hid :] * c
                    i, f, cc = (
                        self._act(0, d, self._clip(i)),
                        self._act(0, d, self._clip(f)),
                        self._act(1, d, self._clip(cc)),
                    )
                    if self.input_forget:
                        f = 1 - i
                    c_new = f * c + i * cc
                    o = o + p[d, hid : 2 * hid] * c_new if p is not None else o
                    h_new = self._act(0, d, self._clip(o)) * self._act(2, d, c_new)
                elif self.op_type == "GRU":
                    xz, xr, xh = torch.chunk(xt, 3, -1)
                    rz, rr, rh = torch.chunk(r[d], 3, 0)
                    bz, br, bh = torch.chunk(rb, 3, -1)
                    zt = self._act(0, d, self._clip(xz + h @ rz.T + bz))
                    rt = self._act(0, d, self._clip(xr + h @ rr.T + br))
                    hh = xh + (rt * (h @ rh.T + bh) if self.lbr else (rt * h) @ rh.T + bh)
                    h_new = (1 - zt) * self._act(1, d, self._clip(hh)) + zt * h
                    c_new = c
                else:
                    h_new = self._act(0, d, self._clip(xt + h @ r[d].T + rb))
                    c_new = c
                if live is not None:
                    h_new, c_new = torch.where(live, h_new, h), torch.where(live, c_new, c)
                    out[t] = torch.where(live, h_new, torch.zeros_like(h_new))
                else:
                    out[t] = h_new
                h, c = h_new, c_new
            ys.append(torch.stack(out, 0))
            hs.append(h)
            cs.append(c)
        y = torch.stack(ys, 1)  # [L, dirs, B, H]
        yh, yc = torch.stack(hs, 0), torch.stack(cs, 0)
        if self.layout:
            y, yh, yc = y.permute(2, 0, 1, 3), yh.transpose(0, 1), yc.transpose(0, 1)
        return (y, yh, yc) if self.op_type == "LSTM" else (y, yh)

    def _clip(self, x):
        return x if self.clip is None else torch.clamp(x, -self.clip, self.clip)


def module_for(node, input_size: int | None) -> nn.Module:
    """The fused form when torch's cell computes the node and W's input size is known, else the loop."""
    return OnnxRecurrent(node, input_size) if fused_variant(node) and input_size else Unrolled(node)


MODULES = {"LSTM": module_for, "GRU": module_for, "RNN": module_for}
