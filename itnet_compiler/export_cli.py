"""``itnet export``: an IR bundle as ONNX, MLIR or a self-contained Triton bundle.

itnet export m.itir --onnx out.onnx [--opset N] [--keep-transforms] [--fallback trace]
itnet export m.itir --mlir out.mlir [--dialect torch|linalg|stablehlo|tosa]
itnet export m.itir --triton out_dir/ [--target sm_90]
(each with [--plan plan.json] [--lowering GLOB=SPEC ...])
"""

from __future__ import annotations

import argparse
import time

from . import cli
from .errors import ItnetError


def cmd_export(ns: argparse.Namespace) -> int:
    if not (ns.onnx or ns.mlir or ns.triton):
        raise ItnetError("say what to write: --onnx out.onnx, --mlir out.mlir or --triton out_dir/")
    prog = cli._load_bundle(ns.bundle)
    plan = cli._plan(ns)
    if ns.onnx:
        from .export.api import export_onnx

        t0 = time.perf_counter()
        model = export_onnx(
            prog, ns.onnx, plan=plan, opset=ns.opset, keep_transforms=ns.keep_transforms, fallback=ns.fallback
        )
        ops = {n.op_type for n in model.graph.node}
        calls = sum(n.domain == "itnet" for n in model.graph.node)
        kept = f", {calls} itnet-domain transform calls" if calls else ""
        print(
            f"wrote {ns.onnx} in {time.perf_counter() - t0:.1f}s: opset {ns.opset}, {len(model.graph.node)} nodes "
            f"({len(ops)} op types{kept}), checked with onnx.checker full_check"
        )
    if ns.mlir:
        from .export.api import export_mlir

        text = export_mlir(prog, ns.mlir, dialect=ns.dialect, plan=plan)
        print(f"wrote {ns.mlir}: {ns.dialect} dialect, {len(text.splitlines())} lines, parsed back by torch-mlir")
    if ns.triton:
        from .export.api import export_triton

        manifest = export_triton(prog, ns.triton, plan=plan, target=ns.target)
        aot = f", compiled for {ns.target}" if ns.target else ""
        print(f"wrote {ns.triton}: {len(manifest['kernels'])} kernels, launcher itnet_bundle.py{aot}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a bundle as ONNX, MLIR or a self-contained Triton bundle")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--onnx", metavar="FILE", help="ONNX model to write (runs in onnxruntime)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18..24 (Attention ops from 23; default 18)")
    p.add_argument(
        "--keep-transforms",
        action="store_true",
        help="each transform as a call of an itnet-domain ONNX function (structure kept)",
    )
    p.add_argument(
        "--fallback",
        choices=("trace",),
        default=None,
        help="a lowering with no ONNX mapping: decompose its torch code (else: one error line)",
    )
    p.add_argument("--mlir", metavar="FILE", help="MLIR to write through torch-mlir (pip install -e .[mlir])")
    p.add_argument("--dialect", choices=("torch", "linalg", "stablehlo", "tosa"), default="torch")
    p.add_argument(
        "--triton", metavar="DIR", help="self-contained Triton bundle to write (needs torch and triton only)"
    )
    p.add_argument("--target", metavar="ARCH", help="with --triton: also compile the kernels ahead of time, e.g. sm_90")
    cli.add_plan_args(p, "JSON plan (layer glob -> lowering spec) or a tuned plan", "*.attn=lowrank")
    p.set_defaults(func=cmd_export)
