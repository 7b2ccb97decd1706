"""The ONNX body of an exact ``gated`` transform (an nn.LSTM / nn.GRU / nn.RNN module): one ONNX ``LSTM`` / ``GRU`` /
``RNN`` node per layer, both directions in it. torch's gate blocks (LSTM i f g o, GRU r z n) are reordered to ONNX's
(i o f c, z r h) by Split / Concat on the weights inside the function, so the weights stay the model's own tensors; GRU
uses ``linear_before_reset=1`` (torch applies r to (W_hn h + b_hn)); the one-gate RNN cells need no reordering and name
their activation (``Tanh`` or ``Relu``, per direction). Projections (``proj_size``) have no ONNX op: those
layers are a ``Scan`` over time (``onnx_scan.lstm_projected``)."""

from __future__ import annotations

import onnx

from ..ir.core import Node
from .onnx_nodes import Nodes

_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}  # ONNX block k takes torch block _ORDER[k]
_RNN_ACTIVATION = {"rnn_tanh": "Tanh", "rnn_relu": "Relu"}


def _reorder(b: Nodes, w: str, cell: str) -> str:
    if cell not in _ORDER:  # one gate block: the same in both layouts
        return w
    parts = b.op("Split", [w], n_out=len(_ORDER[cell]), axis=0, num_outputs=len(_ORDER[cell]))
    return b.op("Concat", [parts[i] for i in _ORDER[cell]], axis=0)


def emit(node: Node, ins: list[str], outs: list[str], opset: int) -> list[onnx.NodeProto]:
    a = node.attrs
    b = Nodes("g")
    roles = [r.rstrip("?") for r in a.roles]
    n_w = len(node.kwargs["weights"])
    x, weights = ins[0], ins[1 : 1 + n_w]
    rest = iter(ins[1 + n_w :])
    h0 = next(rest) if node.kwargs.get("h0") is not None else None
    c0 = next(rest) if "c0" in roles and node.kwargs.get("c0") is not None else None
    unbatched = node.kwargs["x"].type.rank == 2
    if unbatched:
        x = b.op("Unsqueeze", [x, b.ints(1)])
        h0 = b.op("Unsqueeze", [h0, b.ints(1)]) if h0 else None
        c0 = b.op("Unsqueeze", [c0, b.ints(1)]) if c0 else None
    elif a.batch_first:
        x = b.op("Transpose", [x], perm=[1, 0, 2])
    per = 2 + 2 * a.bias + (a.proj_size > 0)
    dirs, hs = a.dirs, a.hidden_size
    hn, cn = [], []
    for layer in range(a.num_layers):
        ws, rs, bs = [], [], []
        for d in range(dirs):
            base = (layer * dirs + d) * per
            w_ih, w_hh = weights[base], weights[base + 1]
            ws.append(b.op("Unsqueeze", [_reorder(b, w_ih, a.cell), b.ints(0)]))
            rs.append(b.op("Unsqueeze", [_reorder(b, w_hh, a.cell), b.ints(0)]))
            if a.bias:
                bias = [_reorder(b, weights[base + 2], a.cell), _reorder(b, weights[base + 3], a.cell)]
                bs.append(b.op("Unsqueeze", [b.op("Concat", bias, axis=0), b.ints(0)]))
        cat = lambda xs: xs[0] if len(xs) == 1 else b.op("Concat", xs, axis=0)  # noqa: E731
        sl = slice(layer * dirs, (layer + 1) * dirs)
        lh = b.op("Slice", [h0, b.ints(sl.start), b.ints(sl.stop), b.ints(0)]) if h0 else ""
        lc = b.op("Slice", [c0, b.ints(sl.start), b.ints(sl.stop), b.ints(0)]) if c0 else ""
        args = [x, cat(ws), cat(rs), cat(bs) if bs else "", "", lh]
        attrs = {"hidden_size": hs, "direction": "bidirectional" if dirs == 2 else "forward"}
        if a.cell == "lstm":
            y, yh, yc = b.op("LSTM", [*args, lc], n_out=3, **attrs)
            cn.append(yc)
        elif a.cell in _RNN_ACTIVATION:
            y, yh = b.op("RNN", args, n_out=2, activations=[_RNN_ACTIVATION[a.cell]] * dirs, **attrs)
        else:
            y, yh = b.op("GRU", args, n_out=2, linear_before_reset=1, **attrs)
        hn.append(yh)
        # Y [L, dirs, B, H] -> [L, B, dirs·H], the next layer's input
        x = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.ints(0, 0, dirs * hs)])
    out_h = hn[0] if len(hn) == 1 else b.op("Concat", hn, axis=0)
    out_c = (cn[0] if len(cn) == 1 else b.op("Concat", cn, axis=0)) if cn else None
    if unbatched:
        x = b.op("Squeeze", [x, b.ints(1)])
        out_h = b.op("Squeeze", [out_h, b.ints(1)])
        out_c = b.op("Squeeze", [out_c, b.ints(1)]) if out_c else None
    elif a.batch_first:
        x = b.op("Transpose", [x], perm=[1, 0, 2])
    b.op("Identity", [x], out=outs[0])
    b.op("Identity", [out_h], out=outs[1])
    if out_c is not None:
        b.op("Identity", [out_c], out=outs[2])
    return b.nodes
