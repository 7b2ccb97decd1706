"""ONNX models as input: an ONNX graph becomes a torch module that computes it op by op (``onnx_ops``), which the
torch frontend then exports and recognises like any model — Conv / ConvTranspose and attention (the ``Attention``
op, or MatMul / Softmax / MatMul written out) become transforms, LSTM / GRU become ``gated`` transforms through
their module converters (``onnx_rnn``), everything else stays generic. Initializers are the module's weights (under
their ONNX names), ONNX dynamic dims (dim_param) become IR symbols, and old opsets (9+) are first brought to the
opset the op table implements with onnx's version converter. Nothing in the file is executed: the op table is
fixed, and an op outside it is one line naming the node and its op type.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx.shape_inference
import onnx.version_converter
import torch
from onnx import numpy_helper

from ..errors import ItnetError, first_line
from . import onnx_nn_ops, onnx_ops, onnx_patterns, onnx_rnn, onnx_shape_ops  # noqa: F401  (the op table)
from .onnx_ops import OPS, OnnxNode, Static

TARGET_OPSET = 18
MIN_OPSET = 9
_STATIC_MAX = 64  # small integer initializers and constants stay Python data (shapes, axes, indices)
_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(elem_type: int, where: str) -> torch.dtype:
    if elem_type not in _DTYPES:
        name = onnx.TensorProto.DataType.Name(elem_type)
        raise ItnetError(f"{where} has element type {name}, which itnet does not import")
    return _DTYPES[elem_type]


def load_onnx(path: str | Path) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise ItnetError(f"no such ONNX file {path}")
    try:
        model = onnx.load(str(p))
    except Exception as e:
        raise ItnetError(f"{path} is not a readable ONNX model: {first_line(e)}") from None
    return model


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline local functions, bring the default domain to at least TARGET_OPSET, infer shapes."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None:
        raise ItnetError("the ONNX model imports no default-domain opset")
    if version < MIN_OPSET:
        raise ItnetError(f"the ONNX model uses opset {version}; itnet imports opset {MIN_OPSET} and later")
    if version < TARGET_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception:  # the op table also reads the older forms (attributes that later became inputs)
            pass
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass
    return model


def _sanitize(name: str) -> str:
    out = re.sub(r"[^A-Za-z0-9_]", "_", name) or "t"
    return "t_" + out if out[0].isdigit() else out


class OnnxModule(torch.nn.Module):
    """Computes one ONNX graph with the torch op table; forward takes the graph's inputs in order."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        g = model.graph
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        inits = {i.name: i for i in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in inits]
        self.output_names = [o.name for o in g.output]
        self._static: dict[str, Static] = {}
        self._weight: dict[str, str] = {}
        for name, init in inits.items():
            arr = numpy_helper.to_array(init)
            self._bind(name, arr)
        shapes = _known_shapes(model)
        self.nodes: list[OnnxNode] = []
        for i, n in enumerate(g.node):
            if n.domain not in ("", "ai.onnx"):
                raise ItnetError(f"node '{n.name or i}' is {n.domain}.{n.op_type}; itnet imports default-domain ops")
            if n.op_type not in OPS and n.op_type not in onnx_rnn.MODULES:
                raise ItnetError(f"node '{n.name or i}' has op type {n.op_type}, which itnet does not import")
            node = OnnxNode(n, self.opset, i)
            if n.op_type == "Constant":
                self._bind(n.output[0], node.constant())
                continue
            if n.op_type in onnx_rnn.MODULES:
                node.module = f"rnn_{_sanitize(n.name or str(i))}"
                w_shape = shapes.get(n.input[1])
                size = int(w_shape[-1]) if w_shape and isinstance(w_shape[-1], int) else None
                self.add_module(node.module, onnx_rnn.MODULES[n.op_type](node, size))
            self.nodes.append(node)
        consts = {name: st.arr for name, st in self._static.items()}
        consts.update(
            {c.output[0]: numpy_helper.to_array(c.attribute[0].t) for c in g.node
             if c.op_type == "Constant" and c.attribute and c.attribute[0].name == "value"}
        )  # fmt: skip
        self.nodes = onnx_patterns.fuse(self.nodes, set(self.output_names), consts)

    def _bind(self, name: str, arr: np.ndarray) -> None:
        small_int = arr.dtype.kind in "iub" and arr.size <= _STATIC_MAX
        if small_int or (arr.dtype.kind == "f" and arr.size == 1 and arr.dtype.itemsize >= 2):  # scales stay known
            self._static[name] = Static(arr)
            return
        key = _sanitize(name)
        while hasattr(self, key):
            key += "_"
        t = torch.from_numpy(np.array(arr, copy=True))
        if t.is_floating_point():
            self.register_parameter(key, torch.nn.Parameter(t, requires_grad=True))
        else:
            self.register_buffer(key, t)
        self._weight[name] = key

    def forward(self, *inputs: torch.Tensor) -> object:
        env: dict[str, object] = dict(self._static)
        for name, key in self._weight.items():
            env[name] = getattr(self, key)
        env.update(zip(self.input_names, inputs, strict=True))
        for node in self.nodes:
            args = [env[x] if x else None for x in node.inputs]
            missing = [x for x in node.inputs if x and x not in env]
            if missing:
                raise ItnetError(f"node '{node.name}' ({node.op_type}) reads undefined values {missing}")
            if isinstance(node, onnx_patterns.FusedAttention):
                env[node.outputs[0]] = onnx_patterns.run_fused(node, env)
                continue
            if node.op_type not in onnx_ops.STATIC_AWARE:  # shape arithmetic stays Python data; other ops take tensors
                args = [onnx_ops.as_tensor(a) if isinstance(a, Static) else a for a in args]
            fn = getattr(self, node.module) if node.module else OPS[node.op_type]
            try:
                out = fn(node, *args) if not node.module else fn(*args)
            except ItnetError:
                raise
            except Exception as e:
                raise ItnetError(f"node '{node.name}' ({node.op_type}) fails: {first_line(e)[:300]}") from None
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            for name, val in zip(node.outputs, outs, strict=False):
                if name:
                    env[name] = val
        results = [onnx_ops.as_tensor(env[n]) for n in self.output_names]
        return results[0] if len(results) == 1 else tuple(results)


def body_model(node: OnnxNode) -> onnx.ModelProto:
    """A Scan body as a model of its own; values of the enclosing graph it reads are refused in one line."""
    body = node.attrs["body"]
    defined = {i.name for i in body.input} | {i.name for i in body.initializer}
    defined |= {o for n in body.node for o in n.output}
    outer = sorted({x for n in body.node for x in n.input if x and x not in defined})
    if outer:
        raise ItnetError(f"node '{node.name}' (Scan): its body reads values of the enclosing graph {outer[:3]}, which "
                         "the importer does not pass in")  # fmt: skip
    return onnx.helper.make_model(body, opset_imports=[onnx.helper.make_opsetid("", node.opset)])


def _known_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Value name -> shape (ints, or dim_param strings) from initializers, inputs and inferred value_info."""
    out: dict[str, list] = {i.name: list(i.dims) for i in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            out.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims])
    return out


def example_inputs(model: onnx.ModelProto, sizes: dict[str, int] | None = None):
    """Inputs of the graph's declared types (random floats, zero integers, True bools) and ``torch.export``
    dynamic shapes: one Dim per dim_param, named by it, at a distinct example size (``sizes`` override them)."""
    inits = {i.name for i in model.graph.initializer}
    gen = torch.Generator().manual_seed(0)
    dims: dict[str, torch.export.Dim] = {}
    chosen: dict[str, int] = {}
    args, dyn = [], []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise ItnetError(f"input '{inp.name}' is not a tensor; itnet imports tensor inputs only")
        dtype = torch_dtype(tt.elem_type, f"input '{inp.name}'")
        shape, spec = [], {}
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
                continue
            name = _sanitize(d.dim_param) if d.dim_param else f"{_sanitize(inp.name)}_{axis}"
            if name not in chosen:
                chosen[name] = (sizes or {}).get(name, 5 + 2 * len(chosen))
                dims[name] = torch.export.Dim(name, min=2)
            shape.append(chosen[name])
            spec[axis] = dims[name]
        if dtype.is_floating_point:
            args.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            args.append((torch.ones if dtype == torch.bool else torch.zeros)(shape, dtype=dtype))
        dyn.append(spec or None)
    return tuple(args), ((tuple(dyn),) if any(dyn) else None)  # forward(*inputs): one group of specs


def import_onnx(source: str | Path | onnx.ModelProto, inputs: tuple | None = None, sizes: dict[str, int] | None = None):
    """(module, example args, dynamic shapes) for an ONNX file or ModelProto; ``inputs`` replace the examples
    (then the declared dims stay static unless ``sizes`` is given)."""
    model = source if isinstance(source, onnx.ModelProto) else load_onnx(source)
    model = normalise(model)
    module = OnnxModule(model).train(False)
    args, dyn = example_inputs(model, sizes)
    if inputs is not None:
        args = tuple(inputs)
    return module, args, dyn
