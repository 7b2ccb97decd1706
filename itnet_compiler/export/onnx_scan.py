"""ONNX ``Scan`` bodies for the recurrences no standard op holds: the ``ssm`` step (Mamba, Mamba2) and projected LSTM
layers (``proj_size``, which ONNX's LSTM lacks). Everything that does not read the state is formed outside the
loop, vectorised over time (Δ, the decays exp(Δ A), the inputs Δ B x, the gates' input terms); the Scan body is the
state update alone, so the length stays dynamic."""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto, helper

from ..errors import ItnetError
from ..ir.core import Node
from .onnx_nodes import Nodes, onnx_dtype

F32 = TensorProto.FLOAT


def _body(name: str, b: Nodes, inputs: list[str], outputs: list[str]) -> onnx.GraphProto:
    vi = lambda n: helper.make_tensor_value_info(n, F32, None)  # noqa: E731
    return helper.make_graph(b.nodes, name, [vi(n) for n in inputs], [vi(n) for n in outputs])


def emit(node: Node, ins: list[str], outs: list[str], opset: int) -> list[onnx.NodeProto]:
    a = node.attrs
    if any(str(node.kwargs[r].type.dtype).startswith("torch.complex") for r in ("A", "B", "C")):
        raise ItnetError(
            "an ssm with a complex state (S4D in recurrent form) has no ONNX mapping; plan it as the "
            "stationary (convolution) form, or export the model converted that way",
            layer=node.layer,
        )
    present = iter(ins)
    got = {r.rstrip("?"): next(present) for r in a.roles if node.kwargs.get(r.rstrip("?")) is not None}
    xt = node.kwargs["x"].type
    H, P, N, G = a.heads, a.head_dim, a.state_size, a.groups
    b = Nodes("s")
    x = b.op("Cast", [got["x"]], to=F32)
    lead = b.op("Shape", [x], start=0, end=2)  # [B, L]
    dt = b.op("Cast", [got["dt"]], to=F32)
    if "dt_bias" in got:
        dt = b.op("Add", [dt, b.op("Cast", [got["dt_bias"]], to=F32)])
    if a.dt_softplus:
        dt = b.op("Softplus", [dt])
    if a.dt_min > -math.inf or a.dt_max < math.inf:
        lo = b.scalar(a.dt_min if a.dt_min > -math.inf else -3.0e38, F32)
        hi = b.scalar(a.dt_max if a.dt_max < math.inf else 3.0e38, F32)
        dt = b.op("Clip", [dt, lo, hi])
    dt = b.op("Expand", [dt, b.op("Concat", [lead, b.ints(H)], axis=0)])  # [B, L, H]

    def per_head(t: str) -> str:
        """B or C -> [B, L, H, N] (head h reads group h // (H / G))."""
        t = b.op("Expand", [b.op("Cast", [t], to=F32), b.op("Concat", [lead, b.ints(G, N)], axis=0)])
        if G == H:
            return t
        t = b.op("Expand", [b.op("Unsqueeze", [t, b.ints(3)]), b.op("Concat", [lead, b.ints(G, H // G, N)], axis=0)])
        return b.op("Reshape", [t, b.ints(0, 0, H, N)])

    A = b.op("Cast", [got["A"]], to=F32)
    dt4 = b.op("Unsqueeze", [dt, b.ints(3)])  # [B, L, H, 1]
    if node.kwargs["A"].type.rank == 2:
        decay = b.op("Unsqueeze", [b.op("Exp", [b.op("Mul", [dt4, A])]), b.ints(3)])  # [B, L, H, 1, N]
    else:
        decay = b.op("Unsqueeze", [b.op("Exp", [b.op("Mul", [dt, A])]), b.ints(3, 4)])  # [B, L, H, 1, 1]
    u = b.op("Unsqueeze", [b.op("Mul", [dt4, x]), b.ints(4)])  # [B, L, H, P, 1]
    inp = b.op("Mul", [u, b.op("Unsqueeze", [per_head(got["B"]), b.ints(3)])])  # [B, L, H, P, N]
    c = per_head(got["C"])  # [B, L, H, N]
    if "h0" in got:
        h0 = b.op("Cast", [got["h0"]], to=F32)
    else:
        shape = b.op("Concat", [b.op("Shape", [x], start=0, end=1), b.ints(H, P, N)], axis=0)
        h0 = b.op("Expand", [b.scalar(0.0, F32), shape])
    body = Nodes("sb")
    h = body.op("Add", [body.op("Mul", ["dec_t", "h_in"]), "inp_t"], out="h_out")
    body.op(
        "ReduceSum",
        [body.op("Mul", [h, body.op("Unsqueeze", ["c_t", body.ints(2)])]), body.ints(-1)],
        out="y_t",
        keepdims=0,
    )
    graph = _body("ssm_step", body, ["h_in", "dec_t", "inp_t", "c_t"], ["h_out", "y_t"])
    h_n, y = b.op(
        "Scan",
        [h0, decay, inp, c],
        n_out=2,
        body=graph,
        num_scan_inputs=3,
        scan_input_axes=[1, 1, 1],
        scan_output_axes=[1],
    )
    if "D" in got:
        d = b.op("Unsqueeze", [b.op("Cast", [got["D"]], to=F32), b.ints(1)])  # [H, 1]
        y = b.op("Add", [y, b.op("Mul", [x, d])])
    b.op("Cast", [y], out=outs[0], to=onnx_dtype(xt))
    if a.return_state:
        b.op("Identity", [h_n], out=outs[1])
    return b.nodes


def lstm_projected(node: Node, ins: list[str], outs: list[str], opset: int) -> list[onnx.NodeProto]:
    """An nn.LSTM with ``proj_size``: per layer and direction a Scan whose state is (h [B, P], c [B, H])."""
    a = node.attrs
    b = Nodes("p")
    n_w = len(node.kwargs["weights"])
    x, weights = ins[0], ins[1 : 1 + n_w]
    rest = iter(ins[1 + n_w :])
    h0 = next(rest) if node.kwargs.get("h0") is not None else None
    c0 = next(rest) if node.kwargs.get("c0") is not None else None
    dt = onnx_dtype(node.kwargs["x"].type)
    unbatched = node.kwargs["x"].type.rank == 2
    if unbatched:
        x, h0, c0 = (b.op("Unsqueeze", [t, b.ints(1)]) if t else None for t in (x, h0, c0))
    elif a.batch_first:
        x = b.op("Transpose", [x], perm=[1, 0, 2])
    batch = b.op("Shape", [x], start=1, end=2)
    if h0 is None:
        h0 = b.op(
            "Expand",
            [b.scalar(0.0, dt), b.op("Concat", [b.ints(a.num_layers * a.dirs), batch, b.ints(a.proj_size)], axis=0)],
        )
    if c0 is None:
        c0 = b.op(
            "Expand",
            [b.scalar(0.0, dt), b.op("Concat", [b.ints(a.num_layers * a.dirs), batch, b.ints(a.hidden_size)], axis=0)],
        )
    per = 2 + 2 * a.bias + 1
    hn, cn = [], []
    for layer in range(a.num_layers):
        ys = []
        for d in range(a.dirs):
            k = layer * a.dirs + d
            w = weights[k * per : (k + 1) * per]
            w_ih, w_hh, w_hr = w[0], w[1], w[-1]
            pre = b.op("MatMul", [x, b.op("Transpose", [w_ih], perm=[1, 0])])  # [L, B, 4H]
            if a.bias:
                pre = b.op("Add", [pre, b.op("Add", [w[2], w[3]])])
            body = Nodes(f"pb{k}_")
            gates = body.op("Add", ["pre_t", body.op("MatMul", ["h_in", body.op("Transpose", [w_hh], perm=[1, 0])])])
            i, f, g, o = body.op("Split", [gates], n_out=4, axis=-1, num_outputs=4)
            c_new = body.op(
                "Add",
                [
                    body.op("Mul", [body.op("Sigmoid", [f]), "c_in"]),
                    body.op("Mul", [body.op("Sigmoid", [i]), body.op("Tanh", [g])]),
                ],
                out="c_out",
            )
            full = body.op("Mul", [body.op("Sigmoid", [o]), body.op("Tanh", [c_new])])
            body.op("MatMul", [full, body.op("Transpose", [w_hr], perm=[1, 0])], out="h_out")
            body.op("Identity", ["h_out"], out="y_t")
            vi = lambda n: helper.make_tensor_value_info(n, dt, None)  # noqa: E731
            graph = helper.make_graph(
                body.nodes,
                f"lstm_proj_{k}",
                [vi("h_in"), vi("c_in"), vi("pre_t")],
                [vi("h_out"), vi("c_out"), vi("y_t")],
            )
            sl = [b.ints(k), b.ints(k + 1), b.ints(0)]
            hk = b.op("Squeeze", [b.op("Slice", [h0, *sl]), b.ints(0)])
            ck = b.op("Squeeze", [b.op("Slice", [c0, *sl]), b.ints(0)])
            h_t, c_t, y = b.op(
                "Scan",
                [hk, ck, pre],
                n_out=3,
                body=graph,
                num_scan_inputs=1,
                scan_input_directions=[d],
                scan_output_directions=[d],
            )
            ys.append(y)
            hn.append(b.op("Unsqueeze", [h_t, b.ints(0)]))
            cn.append(b.op("Unsqueeze", [c_t, b.ints(0)]))
        x = ys[0] if len(ys) == 1 else b.op("Concat", ys, axis=-1)
    out_h, out_c = b.op("Concat", hn, axis=0), b.op("Concat", cn, axis=0)
    if unbatched:
        x, out_h, out_c = (b.op("Squeeze", [t, b.ints(1)]) for t in (x, out_h, out_c))
    elif a.batch_first:
        x = b.op("Transpose", [x], perm=[1, 0, 2])
    for src, dst in zip((x, out_h, out_c), outs, strict=True):
        b.op("Identity", [src], out=dst)
    return b.nodes
