"""ONNX function bodies of ``it.transform`` nodes, one FunctionProto per distinct (attributes, lowering, input types).

Exact lowerings become the standard op of their family: ``dot_exp`` is ``Attention`` at opset 23 and later (MatMul /
Softmax below, ``onnx_attention``), ``stationary`` is Conv / ConvTranspose and ``gated`` LSTM / GRU (through torch's
exporter of the reference lowering), ``ssm`` and ``wkv`` a ``Scan`` over time (``onnx_scan``, ``onnx_wkv``), ``mlp``
(the ITNet layer) its dense lowering's standard ops.
Approximate lowerings are decomposed into standard ops by exporting their torch implementation alone (its random
draws, seeded, become constants: that needs static sizes). A node no emitter maps fails with one line, unless
``fallback="trace"`` asks for its torch lowering decomposed the same way.
"""

from __future__ import annotations

import contextlib
import json

import onnx
import torch
from onnx import helper

from ..errors import ItnetError
from ..ir.core import Node, Value
from ..ir.lowering import REGISTRY, LoweringSpec
from . import draws, onnx_attention, onnx_gated, onnx_scan, onnx_wkv

# Exact references the traced path exports: torch's own op for each family (never a tile loop).
# The ITNet layer's ``mlp`` has no standard op: its dense lowering (products, cos, SiLU, softmax) exports as standard
# ops, with the dynamic sizes kept.
_REFERENCE = {"stationary": "library", "dot_exp": "library", "gated": "library", "ssm": "scan", "mlp": "dense"}
# Approximate lowerings whose torch implementation exports as standard ops (lowrank: FAVOR+ features; montecarlo:
# per_row with the norm or uniform proposal). Others (Nyström's pseudo-inverse, factorised convolution weights,
# multinomial draws) have no ONNX form.
TRACED = {("dot_exp", "lowrank"), ("dot_exp", "montecarlo"), ("mlp", "montecarlo")}


def is_exact(node: Node) -> bool:
    rec = REGISTRY.get((node.family, node.attrs.lowering.name))
    return rec is not None and rec.exact


class FunctionBuilder:
    def __init__(self, opset: int, symbols: dict, fallback: str | None, state: object):
        if fallback not in (None, "trace"):
            raise ItnetError(f"--fallback must be 'trace' (or omitted), not {fallback!r}")
        self.opset, self.symbols, self.fallback, self.state = opset, symbols, fallback, state
        self.functions: list[onnx.FunctionProto] = []
        self.nested: dict[tuple[str, str], onnx.FunctionProto] = {}
        self._by_key: dict[str, str] = {}

    def add(self, node: Node, tensors: list[torch.Tensor]) -> str:
        from .onnx_export import _flat_inputs

        inputs = _flat_inputs(node)
        key = json.dumps([node.attrs.to_dict(), [str(v.type) for v in inputs], [str(o.type) for o in node.outputs]])
        if key in self._by_key:
            return self._by_key[key]
        name = f"{node.family}_{node.attrs.lowering.name}_{len(self.functions)}"
        fn = self._emit(node, name, inputs, tensors)
        fn.doc_string = f"it.transform {node.family} lowering={node.lowering}: " + json.dumps(node.attrs.to_dict())
        self.functions.append(fn)
        self._by_key[key] = name
        return name

    def _emit(self, node: Node, name: str, inputs: list[Value], tensors: list[torch.Tensor]) -> onnx.FunctionProto:
        low = node.attrs.lowering.name
        exact = is_exact(node)
        ins = [f"x{i}" for i in range(len(inputs))]
        outs = [f"y{i}" for i in range(len(node.outputs))]
        if exact and node.family == "dot_exp":
            nodes = onnx_attention.emit(node, ins, outs, self.opset)
            return self._function(name, ins, outs, nodes)
        if exact and node.family == "ssm":
            nodes = onnx_scan.emit(node, ins, outs, self.opset)
            return self._function(name, ins, outs, nodes)
        if exact and node.family == "wkv":
            return self._function(name, ins, outs, onnx_wkv.emit(node, ins, outs, self.opset))
        if exact and node.family == "gated":
            emit = onnx_scan.lstm_projected if node.attrs.proj_size else onnx_gated.emit
            return self._function(name, ins, outs, emit(node, ins, outs, self.opset))
        if exact and node.family in _REFERENCE:
            return self._traced(node, name, tensors, _REFERENCE[node.family])
        if (node.family, low) in TRACED or self.fallback == "trace":
            return self._traced(node, name, tensors, None)
        raise ItnetError(
            f"lowering {node.lowering!r} of family {node.family} has no ONNX mapping; plan an exact lowering for "
            "this layer, or pass --fallback trace to decompose its torch lowering at the example sizes",
            layer=node.layer or None,
        )

    def _function(self, name: str, ins: list[str], outs: list[str], nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
        return helper.make_function("itnet", name, ins, outs, nodes, [helper.make_opsetid("", self.opset)], [])

    def _traced(self, node: Node, name: str, tensors: list[torch.Tensor], reference: str | None) -> onnx.FunctionProto:
        """The node's torch lowering (or the family's exact reference) exported alone, as a function."""
        from ..backends.torch.lowerings import implementation
        from .onnx_export import _flat_inputs, _role_args, dynamic_shapes, torch_to_onnx

        run = node
        if reference is not None and node.attrs.lowering.name != reference:
            attrs = node.attrs.replace(lowering=LoweringSpec(reference))
            run = Node(node.op, node.args, node.kwargs, node.outputs, attrs, node.layer)
        impl, static = implementation(run)

        class One(torch.nn.Module):
            def forward(self, *xs):
                out = impl(*_role_args(run, list(xs)), **static)
                return tuple(out) if isinstance(out, (tuple, list)) else out

        dyn = dynamic_shapes(_flat_inputs(node), self.symbols)
        if reference is None:  # random draws are made at export time: the sizes must stay those of the example
            dyn = None
        what = f"layer '{node.layer}' ({node.family}, lowering {node.lowering})"
        drawn: list[torch.Tensor] = []
        with self.state:
            if reference is None:
                try:
                    with draws.record(drawn), torch.no_grad():
                        One()(*tensors)
                except ItnetError as e:
                    raise ItnetError(str(e), layer=node.layer or None) if e.layer is None else e from None
            with draws.replay(drawn) if reference is None else contextlib.nullcontext():
                model = torch_to_onnx(One(), tuple(tensors), (dyn,) if dyn is not None else None, self.opset, what)
        return self._from_model(model, name)

    def _from_model(self, model: onnx.ModelProto, name: str) -> onnx.FunctionProto:
        g = model.graph
        nodes = [helper.make_node("Constant", [], [init.name], value=init) for init in g.initializer]
        nodes += list(g.node)
        for f in model.functions:
            self.nested.setdefault((f.domain, f.name), f)
        opsets = [o for o in model.opset_import]
        return helper.make_function(
            "itnet", name, [i.name for i in g.input], [o.name for o in g.output], nodes, opsets, []
        )
