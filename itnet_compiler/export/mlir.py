"""MLIR through torch-mlir (``pip install -e .[mlir]``): the planned program built as a torch module (exact lowerings
as torch's own ops, approximations as their torch code) goes through ``torch_mlir.fx.export_and_import`` into the
torch, linalg-on-tensors, stablehlo or tosa dialect, with the IR's symbols as dynamic dims. The text is parsed back
in a torch-mlir context before it is written."""

from __future__ import annotations

from pathlib import Path

from ..errors import ItnetError, first_line
from ..ir.core import Program
from ..ir.lowering import LoweringSpec

DIALECTS = {"torch": "torch", "linalg": "linalg-on-tensors", "stablehlo": "stablehlo", "tosa": "tosa"}
# Exact torch lowerings written as Python loops over a length (row blocks) specialise a dynamic dim when traced; with
# symbols in the program, these export as their exact reference, which is written in whole-tensor ops.
_TRACEABLE = {("mlp", "fused"): "dense"}


def _shape_polymorphic(planned: Program) -> Program:
    if not planned.symbols or not any((n.family, n.lowering) in _TRACEABLE for n in planned.transforms):
        return planned
    out = planned.clone()
    for node in out.transforms:
        ref = _TRACEABLE.get((node.family, node.lowering))
        if ref is not None:
            node.attrs = node.attrs.replace(lowering=LoweringSpec.parse(ref))
    return out


def _torch_mlir():
    try:
        import torch_mlir.fx as fx
        from torch_mlir import ir
    except ImportError:
        raise ItnetError("MLIR export needs torch-mlir: pip install -e '.[mlir]' (or pip install torch-mlir)") from None
    return fx, ir


def parse_back(text: str) -> None:
    """Parse ``text`` in a torch-mlir context (the torch dialect registered, as torch-mlir's importer does; the
    stablehlo dialect is not in torch-mlir's Python context, so its ops are read in generic form)."""
    _, ir = _torch_mlir()
    from torch_mlir.dialects import torch as torch_d

    with ir.Context() as ctx:
        torch_d.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        ir.Module.parse(text)


def export_mlir_planned(planned: Program, path: str | Path | None, dialect: str, sizes=None) -> str:
    from ..backends.torch.codegen import build_torch
    from .onnx_export import dynamic_shapes, example_inputs, quiet

    if dialect not in DIALECTS:
        raise ItnetError(f"--dialect {dialect!r} is not one of {', '.join(DIALECTS)}")
    fx, _ = _torch_mlir()
    planned = _shape_polymorphic(planned)
    module = build_torch(planned)
    for sub in module.gm.modules():  # torch-mlir maps persistent buffers only; constants are buffers to it as well
        sub._non_persistent_buffers_set.clear()
    flat = example_inputs(planned, sizes)
    dyn = dynamic_shapes(planned.inputs, planned.symbols)
    try:
        with quiet(), module.runtime:
            out = fx.export_and_import(
                module.gm, *flat, output_type=DIALECTS[dialect], dynamic_shapes=dyn, func_name="forward"
            )
        # stablehlo: the generic op form, which a context without that dialect (torch-mlir's) parses back
        text = out.operation.get_asm(print_generic_op_form=True) if dialect == "stablehlo" else str(out)
        parse_back(text)
    except ItnetError:
        raise
    except Exception as e:
        raise ItnetError(
            f"torch-mlir cannot lower the program to the {dialect} dialect: {first_line(e)[:300]}"
        ) from None
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text
