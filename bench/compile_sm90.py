"""Compile every kernel the Triton backend launches for sm_90 (H100/H200), on a machine without a GPU.

Why: CI runs the kernels in the interpreter, which knows nothing of shared memory, registers or the NVIDIA toolchain;
a tile that overflows the 227 KB of shared memory a block may use, a kernel that spills, or a construct the GPU
compiler rejects shows up only on a lent card. Triton compiles ahead of time for a CUDA target without a driver.

How: each scenario runs a wrapper of ``itnet_compiler.backends.triton`` (forward, and backward where it has one) on
small CPU tensors with ``JITFunction.run`` patched to record the launch instead of running it. During the recording
every options class's ``default(..., device, ...)`` is handed a cuda device and ``Tensor.is_cuda`` is True, so the
tile sizes, warps and stages are the ones a GPU run picks (the wrappers pick tiny tiles for the CPU interpreter).
Each record is bound by Triton's own binder for a cuda:90 backend, so the signature (``*bf16``, ``i32``, ``fp32``),
the integer specialisations (== 1, divisible by 16) and the options are those a launch on the card compiles. Every
distinct compile then runs in a forked child with a timeout; registers and spills are ptxas's own report (``-v``),
shared memory the kernel's metadata (what the launcher checks against the card's limit).

Checks: FAIL on a compile error or timeout, on shared memory above the 227 KB (232448 bytes) opt-in limit of a block
on sm_90, or on registers × threads above the 65536 registers of a multiprocessor; WARN on spills. Public kernels of
a loaded kernel module that no scenario launches are listed as UNCOVERED (a new kernel needs a scenario here).
The card runs triton 3.6 and this machine 3.9 (DESIGN.md §6): counts may differ by a few registers or a pipeline
stage's buffers; a kernel near a limit here is near it there.

Usage: python bench/compile_sm90.py [--quick] [--only attention,ssd] [--jobs 2] [--timeout 300]
Writes bench/results/compile-sm90.json (``.quick.json`` with --quick); exits 1 if any row fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import multiprocessing as mp
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200: sm_90, 32 threads a warp
SMEM_LIMIT = 232448  # bytes of shared memory one block may opt into on sm_90 (227 KB)
REGS_PER_SM = 65536
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def ptxas_path() -> Path:
    """The ptxas Triton runs for sm_90 (shipped in the triton wheel's ``backends/nvidia/bin``)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path)
    except (ImportError, TypeError, AttributeError):
        return Path(triton.knobs.nvidia.ptxas.path)


PACKAGE = "itnet_compiler.backends.triton"
SKIP_MODULES = {"loader", "codegen", "templates"}


# ------------------------------------------------------------------------------------------------ recording


@dataclass
class Launch:
    """One distinct compile: the kernel, what Triton's binder made of the launch's arguments, where it was seen."""

    family: str
    variant: str
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    also: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self) -> str:
        opts = {k: v for k, v in self.options.items() if k != "extern_libs"}
        return repr((self.fn.fn.__code__.co_filename, self.name, self.signature, sorted(self.constexprs.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()), sorted(opts.items())))  # fmt: skip

    def constexpr_values(self, declared: bool = False) -> dict[str, object]:
        """Constant arguments by name: all of them (ints specialised to 1 included), or the ``tl.constexpr`` ones."""
        params = self.fn.params
        return {params[path[0]].name: val for path, val in self.constexprs.items()
                if len(path) == 1 and (params[path[0]].is_constexpr or not declared)}  # fmt: skip


_BACKEND = None
_BINDERS: dict[int, Callable] = {}
_SCOPE = ["", ""]  # family, variant of the scenario being recorded
_LAUNCHES: list[Launch] = []


def _backend():
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = make_backend(TARGET)
    return _BACKEND


def bind(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """What ``JITFunction.run`` would compile for this launch on a cuda:90 device: signature, constexprs, attrs,
    options (the same binder and packing, with the runtime flags ``run`` adds)."""
    backend = _backend()
    binder = _BINDERS.get(id(fn))
    if binder is None:
        binder = _BINDERS[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    knobs = triton.knobs
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # runtime flags of newer triton versions
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def _record(self: JITFunction, *args, grid, warmup, **kwargs):
    signature, constexprs, attrs, options = bind(self, args, kwargs)
    _LAUNCHES.append(Launch(_SCOPE[0], _SCOPE[1], self, signature, constexprs, attrs, options))
    return None


def _cuda_default(fn: Callable) -> Callable:
    params = list(inspect.signature(fn).parameters)
    pos = params.index("device")

    def default(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = torch.device("cuda")
        elif len(args) > pos:
            args = (*args[:pos], torch.device("cuda"), *args[pos + 1 :])
        return fn(*args, **kwargs)

    return default


def backend_modules() -> tuple[list, dict[str, str]]:
    """The modules of the Triton backend (new ones are picked up), and those that failed to import with why."""
    pkg = importlib.import_module(PACKAGE)
    mods, errors = [], {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in SKIP_MODULES or info.name.startswith("_"):
            continue
        try:
            mods.append(importlib.import_module(f"{PACKAGE}.{info.name}"))
        except Exception as e:  # a module another change is editing: report, go on with the rest
            errors[info.name] = f"{type(e).__name__}: {e}"
    return mods, errors


@contextlib.contextmanager
def no_interpreter() -> Iterator[None]:
    """``TRITON_INTERPRET=0`` for a while: ``@triton.jit`` builds JIT functions and the code generator emits GPU IR
    (a test process runs with the interpreter on)."""
    saved = os.environ.get("TRITON_INTERPRET")
    # Triton's binder imports gluon lazily, which asserts its helpers are JIT functions unless the interpreter is on:
    # import it under the caller's setting first.
    with contextlib.suppress(ImportError):
        importlib.import_module("triton.experimental.gluon")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


@contextlib.contextmanager
def gpu_recording(mods: list) -> Iterator[None]:
    """Launches are recorded, not run; options defaults and ``is_cuda`` answer as on a GPU; ``torch.empty`` gives
    zeros (the wrappers read a few kernel outputs, e.g. row maxima, which would otherwise be garbage)."""
    from itnet_compiler.backends.triton import loader

    saved_loaded = dict(loader._LOADED)
    loader._LOADED.clear()  # interpreter-built modules (TRITON_INTERPRET=1 in a test process) are rebuilt as JIT
    patched = []
    for mod in mods:
        for obj in vars(mod).values():
            raw = vars(obj).get("default") if isinstance(obj, type) and obj.__module__ == mod.__name__ else None
            if isinstance(raw, staticmethod) and "device" in inspect.signature(raw.__func__).parameters:
                patched.append((obj, raw))
                obj.default = staticmethod(_cuda_default(raw.__func__))
    run, empty, empty_like = JITFunction.run, torch.empty, torch.empty_like
    JITFunction.run = _record
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.empty, torch.empty_like = torch.zeros, torch.zeros_like
    try:
        yield
    finally:
        JITFunction.run = run
        del torch.Tensor.is_cuda
        torch.empty, torch.empty_like = empty, empty_like
        for obj, raw in patched:
            obj.default = raw
        jit_loaded = dict(loader._LOADED)
        loader._LOADED.clear()
        loader._LOADED.update(saved_loaded)
        for module in saved_loaded.values():  # put the interpreter's modules back under their names
            sys.modules[module.__name__] = module
        _JIT_MODULES.update(jit_loaded)


_JIT_MODULES: dict[str, object] = {}


def record(scenarios: list[Scenario], mods: list) -> tuple[list[Launch], list[dict]]:
    """Run the scenarios under ``gpu_recording``; distinct launches (first seen names the variant) and errors."""
    _LAUNCHES.clear()
    errors = []
    with no_interpreter(), gpu_recording(mods):
        for sc in scenarios:
            _SCOPE[:] = [sc.family, sc.variant]
            start = len(_LAUNCHES)
            try:
                sc.run()
            except Exception as e:
                errors.append({"family": sc.family, "variant": sc.variant, "error": f"{type(e).__name__}: {e}",
                               "trace": traceback.format_exc(limit=6)})  # fmt: skip
            _label_repeats(_LAUNCHES[start:])
        _load_all_kernel_modules(mods)
    seen: dict[str, Launch] = {}
    for ln in _LAUNCHES:
        first = seen.setdefault(ln.key(), ln)
        if first is not ln:
            first.also.append(f"{ln.family} {ln.variant}")
    return list(seen.values()), errors


def _label_repeats(launches: list[Launch]) -> None:
    """Within one scenario, a kernel launched with different constexprs gets the differing ones in its variant."""
    by_name: dict[str, list[Launch]] = {}
    for ln in launches:
        by_name.setdefault(ln.name, []).append(ln)
    for group in by_name.values():
        values = [ln.constexpr_values(declared=True) for ln in group]
        differ = sorted({k for v in values for k in v if any(w.get(k) != v[k] for w in values)})
        for ln, v in zip(group, values):
            if differ:
                ln.variant += " " + " ".join(f"{k}={v[k]}" for k in differ)


def _load_all_kernel_modules(mods: list) -> None:
    """Load every kernel module a backend module can render (``kernels()``, ``*_kernels()``), for the coverage list."""
    for mod in mods:
        for name, fn in vars(mod).items():
            if not (callable(fn) and (name == "kernels" or name.endswith("_kernels"))):
                continue
            if getattr(fn, "__module__", None) != mod.__name__:
                continue
            try:
                if not any(p.default is inspect.Parameter.empty for p in inspect.signature(fn).parameters.values()):
                    fn()
            except Exception:  # a template mid-edit: its kernels are then simply not listed
                pass


def uncovered(launches: list[Launch]) -> list[str]:
    """Public ``@triton.jit`` kernels of the loaded kernel modules that no scenario launched."""
    launched = {(ln.fn.fn.__code__.co_filename, ln.name) for ln in launches}
    missing = set()
    for module in _JIT_MODULES.values():
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and not name.startswith("_"):
                if (obj.fn.__code__.co_filename, name) not in launched:
                    missing.add(f"{module.__name__.removeprefix('itnet_generated_')}.{name}")
    return sorted(missing)


# ------------------------------------------------------------------------------------------------ compiling


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / LOCAL / STACK / SHARED of the one function in a cubin, from cuobjdump (when there is no ptxas log)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    if "reg" not in usage:
        raise RuntimeError(f"no resource usage in cuobjdump output: {out[-300:]!r}")
    return usage


PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def compile_one(ln: Launch) -> dict[str, object]:
    """Compile for sm_90; registers and spills from ptxas's own report (``-v``, printed by Triton's
    ``dump_ptxas_log``), or from the cubin when the kernel came from Triton's cache."""
    log = io.StringIO()
    knobs = triton.knobs.nvidia
    saved, knobs.dump_ptxas_log = knobs.dump_ptxas_log, True
    t0 = time.perf_counter()
    try:
        with no_interpreter(), contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(ln.fn, ln.signature, ln.constexprs, ln.attrs), target=TARGET,
                                    options=ln.options)  # fmt: skip
    finally:
        knobs.dump_ptxas_log = saved
    seconds = time.perf_counter() - t0
    frame, regs = PTXAS_FRAME.search(log.getvalue()), PTXAS_REGS.search(log.getvalue())
    if frame and regs:
        stack, stores, loads = (int(g) for g in frame.groups())
        n_regs = int(regs.group(1))
    else:
        usage = resource_usage(kernel.asm["cubin"])
        n_regs, stack, stores, loads = usage["reg"], usage.get("stack", 0) + usage.get("local", 0), -1, -1
    return {"seconds": round(seconds, 2), "regs": n_regs, "spills": stores, "spill_loads": loads,
            "stack_bytes": stack, "shared": int(kernel.metadata.shared)}  # fmt: skip


def describe(e: BaseException) -> str:
    """The error and its causes, each as its type and last line (a CompilationError's last line is the source
    position; its cause says what went wrong)."""
    parts = []
    while e is not None and len(parts) < 4:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ("error" in ln.lower() or "fatal" in ln.lower())  # ptxas's own lines
                  and not any(w in ln.lower() for w in ("repro", "aborted"))]  # fmt: skip
        parts.append(f"{type(e).__name__}: {(errors or lines or [''])[-1].strip()}"[:600])
        e = e.__cause__
    return " <- ".join(parts)


def _child(ln: Launch, conn) -> None:
    try:
        conn.send(("ok", compile_one(ln)))
    except BaseException as e:
        conn.send(("error", describe(e)))
    finally:
        conn.close()


def compile_all(launches: list[Launch], jobs: int, timeout: float, on_done: Callable) -> list[dict]:
    """Compile each launch in a forked child (at most ``jobs`` at a time), killing any that runs past ``timeout``."""
    ctx = mp.get_context("fork")
    results: list[dict | None] = [None] * len(launches)
    pending = list(range(len(launches)))
    running: dict[int, tuple] = {}
    while pending or running:
        while pending and len(running) < jobs:
            i = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(launches[i], child), daemon=True)
            proc.start()
            child.close()
            running[i] = (proc, parent, time.perf_counter())
        time.sleep(0.05)
        for i, (proc, conn, started) in list(running.items()):
            elapsed = time.perf_counter() - started
            if conn.poll():
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    kind, payload = "error", f"compiler process died (exit code {proc.exitcode})"
            elif not proc.is_alive():
                kind, payload = "error", f"compiler process died (exit code {proc.exitcode})"
            elif elapsed > timeout:
                proc.kill()
                kind, payload = "error", f"timeout after {timeout:.0f} s"
            else:
                continue
            proc.join(5)
            conn.close()
            del running[i]
            results[i] = judge(launches[i], kind, payload, elapsed)
            on_done(results[i])
    return [r for r in results if r is not None]


def judge(ln: Launch, kind: str, payload, elapsed: float) -> dict[str, object]:
    row: dict[str, object] = {
        "family": ln.family, "kernel": ln.name, "variant": ln.variant, "num_warps": ln.options["num_warps"],
        "num_stages": ln.options["num_stages"], "signature": ln.signature, "constexprs": ln.constexpr_values(),
        "also": ln.also,
    }  # fmt: skip
    if kind != "ok":
        return {**row, "status": "FAIL", "problems": [payload], "seconds": round(elapsed, 2)}
    row.update(payload)
    problems, warnings = [], []
    if row["shared"] > SMEM_LIMIT:
        problems.append(f"shared memory {row['shared']} B > {SMEM_LIMIT} B (227 KB) per block")
    threads = 32 * int(ln.options["num_warps"])
    if row["regs"] * threads > REGS_PER_SM:
        problems.append(f"{row['regs']} registers x {threads} threads > {REGS_PER_SM}")
    elif row["shared"] > 0.95 * SMEM_LIMIT:
        warnings.append(f"shared memory {row['shared']} B within 5% of the limit (triton 3.6 may need more)")
    if row["spills"] > 0:
        warnings.append(f"ptxas spills: {row['spills']} B stores / {row['spill_loads']} B loads")
    elif row["spills"] < 0 and row["stack_bytes"]:  # from the cubin: the stack frame holds any spills
        warnings.append(f"{row['stack_bytes']} B stack frame per thread (spills?)")
    status = "FAIL" if problems else "WARN" if warnings else "OK"
    return {**row, "status": status, "problems": problems + warnings}


# ------------------------------------------------------------------------------------------------ scenarios


@dataclass
class Scenario:
    family: str
    variant: str
    run: Callable[[], object]
    quick: bool = False
    slow: bool = False  # minutes of ptxas on two cores: only with --slow


def _t(*shape, dtype=torch.float32, grad=False, scale=1.0):
    t = (torch.randn(*shape) * scale).to(dtype)
    return t.requires_grad_() if grad else t


def _backward(out) -> None:
    outs = [o for o in (out if isinstance(out, tuple | list) else (out,)) if torch.is_tensor(o) and o.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def attention_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import attention as A

    def case(dtype, d, kind):
        def run():
            b, h, n = 2, 4, 256
            q, k, v = (_t(b, h, n, d, dtype=dtype, grad=True) for _ in range(3))
            mask, causal, window = None, kind in ("causal", "window"), 128 if kind == "window" else 0
            if kind == "bias":  # an additive float mask with no -inf: HAS_BIAS, no block table
                mask = _t(1, 1, n, n) * 0.1
            if kind == "blocks":  # a document mask: HAS_BIAS with the live-tile table
                doc = torch.arange(n) // 96
                mask = doc[:, None] == doc[None, :]
            extras, mod = None, ""
            if kind == "softcap":  # a score expression inlined into every kernel (Gemma2)
                causal, mod = True, "tanh(s / 50.0) * 50.0"
            if kind == "alibi":  # an extra that needs a gradient: the dQ kernel's _mod_grads stores dS
                causal, mod, extras = True, "s + t0", [_t(1, h, 1, n, grad=True)]
            out = A.fused_attention(q, k, v, mask, extras, scale=d**-0.5, causal=causal, window=window, score_mod=mod)
            _backward(out)

        return run

    out = []
    kinds = ("full", "causal", "window", "bias", "blocks", "softcap", "alibi")
    for dtype, dims, ks in ((torch.bfloat16, (64, 128, 256), kinds), (torch.float16, (128,), ("full", "causal")),
                            (torch.float32, (64, 128, 256), ("causal",))):  # fmt: skip
        for d in dims:
            for kind in ks:
                quick = dtype == torch.bfloat16 and (d, kind) in ((128, "causal"), (256, "blocks"), (128, "alibi"))
                quick |= dtype == torch.float32 and d == 128
                out.append(Scenario("attention", f"{NAMES[dtype]} d{d} {kind}", case(dtype, d, kind), quick))
    return out


def conv_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import conv as C

    def case(dtype, cin, cout, size, k, stride, dil, pad, groups, transposed=False, outp=None):
        def run():
            rank = len(size)
            x = _t(2, cin, *size, dtype=dtype, grad=True)
            wshape = (cin, cout // groups, *k) if transposed else (cout, cin // groups, *k)
            w, bias = _t(*wshape, dtype=dtype, grad=True), _t(cout, dtype=dtype, grad=True)
            static = dict(stride=stride, padding=pad, dilation=dil, groups=groups, transposed=transposed,
                          output_padding=outp or (0,) * rank, padding_mode="zeros")  # fmt: skip
            # split_k: on a GPU the weight gradient's K loop is split to fill the device (a runtime int > 1, where the
            # CPU picks 1, which Triton would specialise to a constant)
            _backward(C.stationary_conv(x, w, bias, **static, split_k=4))

        return run

    one, two = ((1,), (1,)), ((1, 1), (1, 1))  # stride and dilation 1
    cases = [  # label, quick, c_in, c_out, size, kernel, (stride, dilation), padding, groups, transposed
        ("depthwise 1d k4 causal", True, 256, 256, (512,), (4,), one, ((3, 0),), 256, False),
        ("depthwise 2d 3x3 s2", False, 64, 64, (32, 32), (3, 3), ((2, 2), (1, 1)), ((1, 1), (1, 1)), 64, False),
        ("gemm 2d 3x3", True, 64, 128, (16, 16), (3, 3), two, ((1, 1), (1, 1)), 1, False),
        ("gemm 1d k3 grouped", False, 64, 128, (256,), (3,), one, ((1, 1),), 4, False),
        ("gemm 2d transposed s2", False, 64, 32, (16, 16), (4, 4), ((2, 2), (1, 1)), ((1, 1), (1, 1)), 1, True),
        ("depthwise 3d 3x3x3", False, 64, 64, (8, 16, 16), (3, 3, 3), ((1, 1, 1), (1, 1, 1)), ((1, 1),) * 3, 64, False),
        ("gemm 3d 3x3x3", False, 32, 64, (8, 16, 16), (3, 3, 3), ((1, 1, 1), (1, 1, 1)), ((1, 1),) * 3, 1, False),
    ]
    return [
        Scenario("conv", f"{NAMES[dt]} {label}", case(dt, ci, co, size, k, sd[0], sd[1], pad, g, tr),
                 quick and dt == torch.bfloat16)
        for dt in (torch.bfloat16, torch.float32)
        for label, quick, ci, co, size, k, sd, pad, g, tr in cases
    ]  # fmt: skip


def conv_approx_scenarios() -> list[Scenario]:
    try:
        from itnet_compiler.backends.triton import conv_approx as CA
    except Exception:
        return []

    def case(dtype, fn, **options):
        def run():
            x = _t(2, 64, 32, 32, dtype=dtype, grad=True)
            w, bias = _t(64, 64, 3, 3, dtype=dtype, grad=True, scale=0.1), _t(64, dtype=dtype, grad=True)
            static = dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1, transposed=False,
                          output_padding=(0, 0), padding_mode="zeros")  # fmt: skip
            _backward(getattr(CA, fn)(x, w, bias, **static, **options))

        return run

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        if hasattr(CA, "conv_montecarlo"):
            out.append(
                Scenario(
                    "conv_approx",
                    f"{NAMES[dtype]} montecarlo shared 3x3",
                    case(dtype, "conv_montecarlo", mode="shared", samples=8),
                    dtype == torch.bfloat16,
                )
            )
        if hasattr(CA, "conv_lowrank"):
            out.append(Scenario("conv_approx", f"{NAMES[dtype]} lowrank 3x3", case(dtype, "conv_lowrank")))
    return out


def ssm_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import ssm as S

    def case(dtype, H, P, N, per_state, train):
        def run():
            b, L = 2, 256
            x = _t(b, L, H, P, dtype=dtype, grad=train)
            dt = _t(b, L, H, dtype=dtype, grad=train, scale=0.5)
            A = (-torch.rand(H, N) - 0.1 if per_state else -torch.rand(H) - 0.1).requires_grad_(train)
            B, Cm = (_t(b, L, 1, N, dtype=dtype, grad=train) for _ in range(2))
            D, bias = _t(H, grad=train), _t(H, grad=train)
            y = S.ssm_scan(x, dt, A, B, Cm, D, bias, None, dt_softplus=True, dt_min=0.0, dt_max=math.inf,
                           return_state=False)  # fmt: skip
            if train:
                _backward(y)

        return run

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        n = NAMES[dtype]
        bf = dtype == torch.bfloat16
        out += [
            Scenario("ssm", f"{n} mamba1 P1 N16 train", case(dtype, 256, 1, 16, True, True), bf),
            Scenario("ssm", f"{n} mamba1 P1 N16 inference", case(dtype, 256, 1, 16, True, False)),
            Scenario("ssm", f"{n} mamba2 P64 N128 train", case(dtype, 4, 64, 128, False, True), bf),
            Scenario("ssm", f"{n} mamba2 P64 N128 inference", case(dtype, 4, 64, 128, False, False)),
        ]
    return out


def ssd_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import ssd as SD

    def case(dtype, H, P, N, chunk, h0):
        def run():
            b, L = 2, 256
            x = _t(b, L, H, P, dtype=dtype, grad=True)
            dt = _t(b, L, H, grad=True, scale=0.5)
            A = (-torch.rand(H) - 0.1).requires_grad_()
            B, Cm = (_t(b, L, 1, N, dtype=dtype, grad=True) for _ in range(2))
            D, bias = _t(H, grad=True), _t(H, grad=True)
            init = _t(b, H, P, N, grad=True) if h0 else None
            _backward(SD.ssd_chunked(x, dt, A, B, Cm, D, bias, init, dt_softplus=True, dt_min=0.0, dt_max=math.inf,
                                     return_state=True, chunk=chunk))  # fmt: skip

        return run

    return [
        Scenario("ssd", "bf16 P64 N128 Q64", case(torch.bfloat16, 4, 64, 128, 64, False), True),
        Scenario("ssd", "bf16 P64 N128 Q64 h0", case(torch.bfloat16, 4, 64, 128, 64, True)),
        Scenario("ssd", "bf16 P128 N256 Q64 (largest)", case(torch.bfloat16, 2, 128, 256, 64, False), True),
        Scenario("ssd", "fp16 P64 N128 Q64", case(torch.float16, 4, 64, 128, 64, False)),
        Scenario("ssd", "fp32 P64 N128 Q64", case(torch.float32, 4, 64, 128, 64, False)),
        Scenario("ssd", "fp32 P128 N256 Q64 (largest)", case(torch.float32, 2, 128, 256, 64, False), slow=True),
    ]


def wkv_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import wkv as WK

    def case(dtype, fn, train, **options):
        def run():
            b, L, c = 2, 256, 512
            k, v = (_t(b, L, c, dtype=dtype, grad=train) for _ in range(2))
            w, u = torch.rand(c).requires_grad_(train), _t(c, grad=train)
            y = getattr(WK, fn)(k, v, w, u, **options)
            if train:
                _backward(y)

        return run

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        n, bf = NAMES[dtype], dtype == torch.bfloat16
        out += [Scenario("wkv", f"{n} C512 scan train", case(dtype, "wkv_scan", True), bf)]
        out += [Scenario("wkv", f"{n} C512 chunked T{t} train", case(dtype, "wkv_chunked", True, chunk=t), bf)
                for t in (16, 32, 64)]  # fmt: skip
    out.append(Scenario("wkv", "fp16 C512 chunked T32 inference", case(torch.float16, "wkv_chunked", False, chunk=32)))
    return out


def gated_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import gated as G

    def case(dtype, cell, h, proj):
        def run():
            cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
            extra = {"proj_size": proj} if proj else {}
            rnn = cls(64, h, **extra)
            weights = [w.detach().to(dtype).requires_grad_() for w in rnn._flat_weights]
            x = _t(16, 64, 64, dtype=dtype, grad=True)  # T16 B64 I64
            out = G.gated_scan(x, weights, None, None, cell=cell, hidden_size=h, proj_size=proj, num_layers=1,
                               bidirectional=False, batch_first=False, bias=True)  # fmt: skip
            _backward(out)

        return run

    def label(dtype, cell, h, proj):
        gates = 4 if cell == "lstm" else 3
        cfg = G._config(64, h, proj or h, gates, bool(proj), dtype, True)
        path = "resident" if cfg.resident else "streamed"
        return f"{NAMES[dtype]} {cell} H{h}{f' P{proj}' if proj else ''} {path} {'dot' if cfg.dot else 'fma'}"

    cases = [(torch.bfloat16, "lstm", 64, 0, True), (torch.bfloat16, "lstm", 256, 0, True),
             (torch.bfloat16, "lstm", 32, 16, False), (torch.bfloat16, "lstm", 256, 128, True),
             (torch.float16, "lstm", 128, 0, False), (torch.float32, "lstm", 32, 0, True),
             (torch.float32, "lstm", 256, 0, False), (torch.float32, "lstm", 256, 128, False),
             (torch.bfloat16, "gru", 64, 0, True), (torch.bfloat16, "gru", 256, 0, False),
             (torch.float32, "gru", 32, 0, False), (torch.float32, "gru", 256, 0, True)]  # fmt: skip
    return [Scenario("gated", label(dt, c, h, p), case(dt, c, h, p), q) for dt, c, h, p, q in cases]


def lowrank_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import lowrank as LR

    def case(dtype, d, causal, local, masked):
        def run():
            b, h, n = 2, 4, 512
            q, k, v = (_t(b, h, n, d, dtype=dtype, grad=True) for _ in range(3))
            mask = None
            if masked:
                mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
                mask[0, ..., -5:] = False
            _backward(LR.attention_lowrank(q, k, v, mask, scale=d**-0.5, causal=causal, method="favor", rank=64,
                                           chunk=128, local=local))  # fmt: skip

        return run

    return [
        Scenario("lowrank", "bf16 d64 causal local=1 mask", case(torch.bfloat16, 64, True, 1, True), True),
        Scenario("lowrank", "bf16 d128 causal local=0", case(torch.bfloat16, 128, True, 0, False)),
        Scenario("lowrank", "bf16 d128 full", case(torch.bfloat16, 128, False, 1, False), True),
        Scenario("lowrank", "fp32 d64 causal local=1", case(torch.float32, 64, True, 1, False)),
        Scenario("lowrank", "fp32 d128 full mask", case(torch.float32, 128, False, 1, True)),
    ]


def montecarlo_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import montecarlo as MC

    def case(dtype, d, mode, causal, masked):
        def run():
            b, h, n = 2, 4, 256
            q, k, v = (_t(b, h, n, d, dtype=dtype, grad=True) for _ in range(3))
            mask = None
            if masked:
                mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
                mask[0, ..., -5:] = False
            _backward(MC.montecarlo_attention(q, k, v, mask, scale=d**-0.5, causal=causal, samples=64, mode=mode))

        return run

    return [
        Scenario("montecarlo", f"{NAMES[dt]} d{d} {mode}{' causal mask' if masked else ''}",
                 case(dt, d, mode, masked, masked), dt == torch.bfloat16 and d == 64 and not masked)
        for dt in (torch.bfloat16, torch.float32)
        for d in (64, 128)
        for mode in ("per_row", "shared")
        for masked in (False, True)
    ]  # fmt: skip


def hybrid_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import hybrid as HY

    def case(dtype, d, causal, values, block):
        def run():
            b, h, n = 1, 4, 512
            q, k, v = (_t(b, h, n, d, dtype=dtype, grad=True) for _ in range(3))
            _backward(HY.hybrid_attention(q, k, v, scale=d**-0.5, causal=causal, block=block, blocks=4, samples=64,
                                          values=values))  # fmt: skip

        return run

    return [
        Scenario("hybrid", f"{NAMES[dt]} d{d} block{blk} {values}{' causal' if causal else ''}",
                 case(dt, d, causal, values, blk), dt == torch.bfloat16 and d == 64 and causal)
        for dt in (torch.bfloat16, torch.float32)
        for d in (64, 128)
        for blk in (64, 128)
        for values in ("pooled", "sampled")
        for causal in (True, False)
        if not (dt == torch.float32 and blk == 128 and d == 128)
    ]  # fmt: skip


def mlp_scenarios() -> list[Scenario]:
    from itnet_compiler.backends.triton import mlp as ML

    def case(dtype, hidden, dv, normalize, causal, features, dx, weighted):
        def run():
            b, h, n = 2, 4, 256
            had = "hadamard" in features
            a, bb = (_t(b, n, hidden, dtype=dtype, grad=True) if had else None for _ in range(2))
            rho, gamma = (_t(b, n, hidden, dtype=dtype, grad=True) for _ in range(2))
            xq = xk = _t(1, n, dx, dtype=dtype)
            v = _t(b, h, n, dv, dtype=dtype, grad=True)
            params = [_t(hidden, dx, dtype=dtype, grad=True), _t(hidden, dtype=dtype, grad=True),
                      _t(hidden, dx, dtype=dtype), _t(hidden, dtype=dtype), _t(hidden, dtype=dtype, grad=True),
                      _t(h, hidden, dtype=dtype, grad=True), _t(h, dtype=dtype, grad=True)]  # fmt: skip
            mu = _t(b, n, dtype=dtype, grad=True) if weighted else None  # the importance measure's weights
            _backward(ML.mlp_fused(a, bb, rho, gamma, xq, xk, v, mu, *params, normalize=normalize, causal=causal,
                                   features=features, measure="importance" if weighted else "uniform"))  # fmt: skip

        return run

    every, some = ("hadamard", "offset", "dist2", "fourier"), ("offset", "fourier")
    cases = [(torch.bfloat16, 32, 64, True, True, every, 1, False, True),
             (torch.bfloat16, 64, 128, False, False, every, 1, False, True),
             (torch.bfloat16, 64, 128, True, False, some, 2, True, False),
             (torch.float16, 32, 128, True, True, every, 1, False, False),
             (torch.float32, 64, 128, True, False, every, 1, False, True),
             (torch.float32, 32, 64, False, True, some, 3, True, False)]  # fmt: skip
    return [
        Scenario("mlp", f"{NAMES[dt]} H{hd} dv{dv} {'softmax' if nm else 'measure'}{' causal' if c else ''} "
                 f"{'+'.join(x[:3] for x in f)} dx{dx}{' weighted' if w else ''}", case(dt, hd, dv, nm, c, f, dx, w), q)
        for dt, hd, dv, nm, c, f, dx, w, q in cases
    ]  # fmt: skip


FAMILIES = {
    "attention": attention_scenarios,
    "hybrid": hybrid_scenarios,
    "conv": conv_scenarios,
    "conv_approx": conv_approx_scenarios,
    "ssm": ssm_scenarios,
    "ssd": ssd_scenarios,
    "gated": gated_scenarios,
    "wkv": wkv_scenarios,
    "lowrank": lowrank_scenarios,
    "montecarlo": montecarlo_scenarios,
    "mlp": mlp_scenarios,
}


def scenarios(quick: bool, only: list[str] | None, slow: bool = False) -> tuple[list[Scenario], list[dict]]:
    out, errors = [], []
    for family, make in FAMILIES.items():
        if only and not any(o in family for o in only):
            continue
        try:
            out += [s for s in make() if (s.quick or not quick) and (slow or not s.slow)]
        except Exception as e:  # a module mid-edit elsewhere: one error row, the other families still run
            errors.append({"family": family, "variant": "(import)", "error": f"{type(e).__name__}: {e}"})
    return out, errors


# ------------------------------------------------------------------------------------------------ main


COLUMNS = ("kernel", "variant", "warps", "stages", "regs", "spillB", "smem B", "sec", "status")
WIDTHS = (22, 46, 5, 6, 5, 6, 7, 6, 6)


def _line(cells) -> str:
    return " ".join(str(c)[:w].ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))


def print_row(r: dict) -> None:
    cells = (r["kernel"], f"{r['family']} {r['variant']}", r["num_warps"], r["num_stages"], r.get("regs", "-"),
             r.get("spills", "-"), r.get("shared", "-"), r.get("seconds", "-"), r["status"])  # fmt: skip
    print(_line(cells) + ("  " + "; ".join(r["problems"])[:400] if r["problems"] else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset: one or two variants per family")
    ap.add_argument("--only", default="", help="comma-separated family names (or substrings)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiles at a time")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one compile may take")
    ap.add_argument("--match", default="", help="compile only launches whose 'family variant kernel' contains this")
    ap.add_argument("--slow", action="store_true", help="also the scenarios that take minutes to compile")
    ap.add_argument("--out", default="", help="write the JSON here instead of bench/results/")
    ap.add_argument("--list", action="store_true", help="record and list the compiles, compile nothing")
    ap.add_argument("--cache", action="store_true", help="reuse Triton's cache (compile times are then not real)")
    args = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, not the interpreter's
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.6's default; silences 3.9's warning
    for tool in (ptxas_path(), BIN / "cuobjdump"):
        if not tool.exists():
            print(f"{tool} not found: the triton wheel ships it; reinstall triton", file=sys.stderr)
            return 2
    cache = None if args.cache else tempfile.TemporaryDirectory(prefix="itnet-sm90-")
    if cache is not None:
        os.environ["TRITON_CACHE_DIR"] = cache.name
    t0 = time.perf_counter()
    torch.manual_seed(0)
    mods, import_errors = backend_modules()
    scs, errors = scenarios(args.quick, [o for o in args.only.split(",") if o] or None, args.slow)
    errors += [{"family": name, "variant": "(import)", "error": err} for name, err in import_errors.items()]
    launches, run_errors = record(scs, mods)
    errors += run_errors
    partial = bool(args.only or args.quick or args.match)
    if args.match:
        launches = [ln for ln in launches if args.match in f"{ln.family} {ln.variant} {ln.name}"]
    record_s = time.perf_counter() - t0
    print(f"triton {triton.__version__}, target cuda sm_90; {len(scs)} scenarios -> {len(launches)} distinct "
          f"compiles (recorded in {record_s:.1f} s), {args.jobs} at a time", flush=True)  # fmt: skip
    if args.list:
        for ln in launches:
            print(
                f"{ln.family:11} {ln.variant:40} {ln.name:22} warps={ln.options['num_warps']} "
                f"stages={ln.options['num_stages']} {ln.constexpr_values(declared=True)}"
            )
        for e in errors:
            print(f"SCENARIO FAIL {e['family']} {e['variant']}: {e['error']}\n{e.get('trace', '')}")
        print("uncovered:", uncovered(launches))
        return 1 if errors else 0
    print(_line(COLUMNS))
    rows = compile_all(launches, args.jobs, args.timeout, print_row)
    missing = [] if partial else uncovered(launches)
    for e in errors:
        print(f"SCENARIO FAIL {e['family']} {e['variant']}: {e['error']}")
    for name in missing:
        print(f"UNCOVERED {name}: no scenario launches it (add one to bench/compile_sm90.py)")
    fails = [r for r in rows if r["status"] == "FAIL"]
    warns = [r for r in rows if r["status"] == "WARN"]
    total = time.perf_counter() - t0
    print(f"{len(rows)} compiles: {len(rows) - len(fails) - len(warns)} OK, {len(warns)} WARN (spills), "
          f"{len(fails)} FAIL; {len(errors)} scenario errors; {len(missing)} uncovered; {total:.0f} s")  # fmt: skip
    summary = {"compiles": len(rows), "fail": len(fails), "warn": len(warns), "seconds": round(total)}
    payload = {"triton": triton.__version__, "target": "cuda sm_90 (warp 32)", "smem_limit": SMEM_LIMIT,
               "rows": rows, "scenario_errors": errors, "uncovered": missing, "summary": summary}  # fmt: skip
    if args.out:
        path = Path(args.out)
        path.write_text(json.dumps({"benchmark": "compile-sm90", "quick": partial, **payload}, indent=2) + "\n")
    else:
        path = _common.write_result("compile-sm90", payload, partial)
    print(f"wrote {path}")
    if cache is not None:
        cache.cleanup()
    return 1 if fails or errors or missing else 0


if __name__ == "__main__":
    sys.exit(main())
