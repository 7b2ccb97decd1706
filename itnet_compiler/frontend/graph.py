"""Frontend for graphs that are already traced: an ATen-level ``torch.fx.GraphModule`` -> an IR Program.

This is the entry point for graphs that torch captured itself, such as the forward graphs AOTAutograd hands a
``torch.compile`` backend: every placeholder is a positional user input (parameters included, since AOTAutograd
lifts them), ``get_attr`` tensors become constants, and the outputs are the graph's flat output tuple. Node
import is the one ``export.py`` uses (same op allow-list, same layer names from ``nn_module_stack``), so
recognition treats both graphs alike.

Expects: call_function nodes with ``meta["val"]`` (fake tensors or SymInts), as AOTAutograd and ``make_fx`` leave.
Guarantees: valid IR; ``in_spec`` is ``((x1, ..., xn), {})`` and ``out_spec`` a flat tuple, so the built module is
called ``mod(*flat_inputs)`` and returns a tuple; symbolic sizes keep torch's names (``s0``, ``s27``) with
unbounded ranges; ``aten.view`` becomes ``aten.reshape`` (these graphs rely on the strides of the kernels torch traced,
which a recognised transform need not reproduce).
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import ItnetError
from ..ir import treespec
from ..ir.core import Program, Value, Weight
from ..ir.types import TensorType
from .export import _Importer, _ssa


class _GraphImporter(_Importer):
    """``_Importer`` over a bare GraphModule: no export signature, no state dict, no range constraints."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(None, {}, {})  # type: ignore[arg-type]
        self.gm = gm

    def run(self) -> Program:
        n_inputs = 0
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.env[n] = v = Value(_ssa(n.name), self.type_of(n.meta.get("val"), n.name))
                self.prog.inputs.append(v)
                n_inputs += 1
            elif n.op == "get_attr":
                self.constant(n)
            elif n.op == "call_function":
                self.call(n)
            elif n.op == "output":
                self.output(n)
            else:
                raise ItnetError(f"unsupported graph node kind {n.op} ({n.name}); only ATen-level graphs are imported")
        for node in self.prog.nodes:
            # ``aten.view`` read as ``aten.reshape``: the same view wherever the traced strides allow one, and a copy
            # where an itnet lowering returns another layout than the kernel torch traced (fused SDPA outputs).
            if node.op == "aten.view.default":
                node.op = "aten.reshape.default"
        n_outputs = len(self.prog.outputs)
        self.prog.in_spec = treespec.to_json(pytree.tree_flatten((tuple(range(n_inputs)), {}))[1])
        self.prog.out_spec = treespec.to_json(pytree.tree_flatten(tuple(range(n_outputs)))[1])
        self.symbols()
        return self.prog

    def graph(self) -> fx.Graph:
        return self.gm.graph

    def constant(self, n: fx.Node) -> None:
        tensor = getattr(self.gm, str(n.target), None)
        if not isinstance(tensor, torch.Tensor):
            raise ItnetError(f"graph attribute {n.target} is not a tensor ({type(tensor).__name__}); it cannot be held")
        v = Value(_ssa(n.name), TensorType(tensor.dtype, tuple(sympy.Integer(int(d)) for d in tensor.shape)))
        self.env[n] = v
        key = str(n.target)
        self.prog.weights.append(Weight(v, key, "const"))
        self.prog.tensors[key] = tensor.detach()

    def output(self, n: fx.Node) -> None:
        outs = n.args[0]
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for o in outs:
            if o is None or not isinstance(o, fx.Node):
                raise ItnetError(f"graph output {o!r} is not a computed value; only tensors and sizes can be outputs")
        self.prog.outputs = [self.arg(o, n) for o in outs]

    def symbols(self) -> None:
        """Every symbol a value uses, unbounded: the graph carries no range constraints of its own."""
        used: set[str] = set()
        for v in self.prog.values():
            if isinstance(v.type, TensorType):
                for d in v.type.shape:
                    used |= {x.name for x in d.free_symbols}
            elif v.type.expr is not None:
                used |= {x.name for x in v.type.expr.free_symbols}
        for name in sorted(used):
            self.prog.symbols.setdefault(name, [0, None])


def import_graph(gm: fx.GraphModule) -> Program:
    """The IR of an ATen-level GraphModule whose nodes carry ``meta["val"]`` (see the module docstring)."""
    return _GraphImporter(gm).run()
