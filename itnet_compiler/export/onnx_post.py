"""After torch's exporter: transform calls become ``itnet``-domain function calls (kept, or inlined into standard
ops), dynamic dims take the IR's symbol names, and the model must pass ``onnx.checker`` with ``full_check``."""

from __future__ import annotations

import json
import re

import onnx
import onnx.inliner
import sympy
from onnx import helper

from ..errors import ItnetError, first_line
from ..ir.core import Node, Program, iter_values
from ..ir.types import TensorType
from .onnx_nodes import onnx_dtype


def finish(
    model: onnx.ModelProto,
    prog: Program,
    functions: list[onnx.FunctionProto],
    nested: list[onnx.FunctionProto],
    calls: dict[int, tuple[str, Node]],
    keep_transforms: bool,
    opset: int,
) -> onnx.ModelProto:
    from .onnx_export import EXPORT_DOMAIN, ITNET_DOMAIN

    taken = {n.name for n in model.graph.node}
    for n in model.graph.node:
        if n.domain != EXPORT_DOMAIN:
            continue
        index = next(a.i for a in n.attribute if a.name == "index")
        fname, node = calls[index]
        del n.attribute[:]
        n.domain, n.op_type = ITNET_DOMAIN, fname
        base = node.layer or node.outputs[0].name
        n.name = next(
            f"{base}#{k}" if k else base for k in range(len(taken) + 1) if (f"{base}#{k}" if k else base) not in taken
        )
        taken.add(n.name)
        del n.metadata_props[:]
        for key, val in (("itnet.layer", node.layer), ("itnet.family", node.family), ("itnet.lowering", node.lowering)):
            n.metadata_props.append(onnx.StringStringEntryProto(key=key, value=str(val)))
    model.functions.extend(functions)
    model.functions.extend(nested)
    domains = {o.domain: o.version for o in model.opset_import if o.domain != EXPORT_DOMAIN}
    for f in [*functions, *nested]:
        for o in f.opset_import:
            domains.setdefault(o.domain, o.version)
    domains[ITNET_DOMAIN] = 1
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in domains.items())
    if not keep_transforms:
        model = onnx.inliner.inline_local_functions(model)
        used = {n.domain for n in model.graph.node}
        keep = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    _drop_untyped(model, prog)
    _rename_dims(model, prog)
    model.producer_name = "itnet"
    del model.metadata_props[:]
    from ..plan import program_hash

    meta = {
        "itnet.program_hash": program_hash(prog),
        "itnet.lowerings": json.dumps({n.name: n.lowering for n in prog.transforms}),
    }
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ItnetError(f"the exported ONNX model fails onnx.checker: {first_line(e)[:300]}") from None
    return model


def _drop_untyped(model: onnx.ModelProto, prog: Program) -> None:
    """value_info the exporter could not type (outputs of a multi-output transform call) is dropped: shape
    inference fills it in. Graph outputs take their type from the IR."""
    keep = [vi for vi in model.graph.value_info if vi.HasField("type")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    ir_outputs = [v for v in iter_values(prog.outputs)]
    for i, o in enumerate(model.graph.output):
        if o.HasField("type"):
            continue
        if i >= len(ir_outputs) or not isinstance(ir_outputs[i].type, TensorType):
            raise ItnetError(f"the exporter gave output {o.name} no type")
        t = ir_outputs[i].type
        dims = [int(d) if d.is_Integer else str(d) for d in t.shape]
        o.type.CopyFrom(helper.make_tensor_type_proto(onnx_dtype(t), dims))


_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _rename_dims(model: onnx.ModelProto, prog: Program) -> None:
    """torch names dynamic dims s0, s1, ...: use the IR's symbols (seq, batch) wherever they appear."""
    mapping: dict[str, str] = {}
    by_name = {v.name: v for v in prog.inputs}
    for inp in model.graph.input:
        v = by_name.get(inp.name)
        if v is None or not isinstance(v.type, TensorType):
            continue
        for d, ir_dim in zip(inp.type.tensor_type.shape.dim, v.type.shape, strict=False):
            if d.dim_param and isinstance(ir_dim, sympy.Symbol):
                mapping.setdefault(d.dim_param, ir_dim.name)
    if not mapping:
        return

    def fix(text: str) -> str:
        return _TOKEN.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)

    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = fix(d.dim_param)
