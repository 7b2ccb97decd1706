"""ONNX ``Scan`` body of ``wkv`` (RWKV's WKV): the stabilised (numerator, denominator, maximum) state of each channel
carried over time, exactly the arithmetic of the torch ``scan`` lowering, so the length stays dynamic. The log-decay
a = -w and the bonus u are formed once outside the loop and read by the body from the enclosing scope."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..ir.core import Node
from .onnx_nodes import Nodes, onnx_dtype

F32 = TensorProto.FLOAT
NEG = -1e38  # the maximum of an empty past, as the torch lowering starts it


def emit(node: Node, ins: list[str], outs: list[str], opset: int) -> list[onnx.NodeProto]:
    k_in, v_in, w_in, u_in = ins
    b = Nodes("wk")
    k, v = b.op("Cast", [k_in], to=F32), b.op("Cast", [v_in], to=F32)
    a = b.op("Neg", [b.op("Cast", [w_in], to=F32)])
    u = b.op("Cast", [u_in], to=F32)
    shape = b.op("Concat", [b.op("Shape", [k], start=0, end=1), b.ints(node.attrs.channels)], axis=0)  # [B, C]
    zero = b.op("Expand", [b.scalar(0.0, F32), shape])
    low = b.op("Expand", [b.scalar(NEG, F32), shape])
    s = Nodes("wkb")
    ku = s.op("Add", ["k_t", u])
    top = s.op("Max", ["o_in", ku])
    e1, e2 = s.op("Exp", [s.op("Sub", ["o_in", top])]), s.op("Exp", [s.op("Sub", [ku, top])])
    num = s.op("Add", [s.op("Mul", [e1, "p_in"]), s.op("Mul", [e2, "v_t"])])
    s.op("Div", [num, s.op("Add", [s.op("Mul", [e1, "q_in"]), e2])], out="y_t")
    oa = s.op("Add", ["o_in", a])
    nxt = s.op("Max", [oa, "k_t"])
    f1, f2 = s.op("Exp", [s.op("Sub", [oa, nxt])]), s.op("Exp", [s.op("Sub", ["k_t", nxt])])
    s.op("Add", [s.op("Mul", [f1, "p_in"]), s.op("Mul", [f2, "v_t"])], out="p_out")
    s.op("Add", [s.op("Mul", [f1, "q_in"]), f2], out="q_out")
    s.op("Identity", [nxt], out="o_out")
    vi = lambda n: helper.make_tensor_value_info(n, F32, None)  # noqa: E731
    body = helper.make_graph(
        s.nodes, "wkv_step", [vi(n) for n in ("p_in", "q_in", "o_in", "k_t", "v_t")],
        [vi(n) for n in ("p_out", "q_out", "o_out", "y_t")],
    )  # fmt: skip
    *_, y = b.op(
        "Scan", [zero, zero, low, k, v], n_out=4, body=body, num_scan_inputs=2, scan_input_axes=[1, 1],
        scan_output_axes=[1],
    )  # fmt: skip
    b.op("Cast", [y], out=outs[0], to=onnx_dtype(node.kwargs["k"].type))
    return b.nodes
