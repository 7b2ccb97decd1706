"""The holes a score modification fills in ``templates.ATTENTION``: the node's expression inlined into every kernel.

From one description of the extras (``ModSpec``: the expression, which extras are boolean, which need a gradient)
come the argument lists (one signature, in the forward, dQ and dK/dV kernels and every helper between them, with
the strides swapped where a helper works on transposed tiles), the kernel hole (loads of the extras' tiles, the
expression, its derivative in s for the backward) and the dQ kernel's store of dS·∂m/∂tK for extras that require a
gradient. Without a modification every hole but KERNEL is empty and the kernels are the plain ones.

The expression is computed in natural units (sigma = scale·⟨q, k⟩) and converted to the base-2 logits the template
works in; a finite logit that overflows in base 2 (a ``finfo.min`` fill) is clamped to the most negative float, so a
row whose every entry is so filled stays the uniform average eager torch gives it, never 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...ir import score_mod as sm
from .templates import attention as templates

FMAX = 3.4028234663852886e38

# tanh from exp (the interpreter has no tanh): an odd polynomial near 0, where 1 - e^{-2|x|} would cancel.
TANH = """

@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)
"""


@dataclass(frozen=True)
class ModSpec:
    text: str
    booleans: tuple[bool, ...]  # per extra: read as a condition
    grads: tuple[bool, ...]  # per extra: dS·∂m/∂tK is stored

    @property
    def expr(self) -> sm.Expr:
        return sm.parse(self.text)


def code(e: sm.Expr) -> str:
    """The Triton expression of ``e`` over the tile's locals (sigma, b, h, ii, jj, t0..)."""
    op = e.op
    if op == "num":
        if math.isinf(e.value):
            return 'float("-inf")' if e.value < 0 else 'float("inf")'
        return repr(e.value) if e.value >= 0 else f"({e.value!r})"
    if op == "var":
        return {"s": "sigma", "i": "ii", "j": "jj"}.get(e.name, e.name)
    if op == "neg":
        return f"(-{code(e.args[0])})"
    if op in ("add", "sub", "mul", "div"):
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[op]
        return f"({code(e.args[0])} {sym} {code(e.args[1])})"
    if op == "tanh":
        return f"_tanh({code(e.args[0])})"
    if op == "exp":
        return f"tl.exp({code(e.args[0])})"
    return f"tl.where({code(e.args[0])}, {code(e.args[1])}, {code(e.args[2])})"


def _params(n: int, prefix: str = "T", trans: bool = False) -> str:
    out = []
    for k in range(n):
        low = prefix.lower()
        m, j = (f"{low}{k}sn", f"{low}{k}sm") if trans else (f"{low}{k}sm", f"{low}{k}sn")
        out.append(f" {prefix}{k}, {low}{k}sb, {low}{k}sh, {m}, {j},")
    return "".join(out)


def _loads(spec: ModSpec, indent: str) -> list[str]:
    lines = []
    for k, boolean in enumerate(spec.booleans):
        ptr = f"T{k} + b * t{k}sb + h * t{k}sh + offs_m[:, None] * t{k}sm + offs_n[None, :] * t{k}sn"
        load = f"tl.load({ptr}, mask=inb, other=0)"
        lines.append(f"{indent}t{k} = {load} != 0" if boolean else f"{indent}t{k} = {load}.to(tl.float32)")
    return lines


def _indices(indent: str) -> list[str]:
    return [f"{indent}if TRANS:", f"{indent}    ii = offs_n[None, :]", f"{indent}    jj = offs_m[:, None]",
            f"{indent}else:", f"{indent}    ii = offs_m[:, None]", f"{indent}    jj = offs_n[None, :]"]  # fmt: skip


def kernel(spec: ModSpec, bias_lines: str) -> str:
    """The KERNEL hole: sigma, the extras' tiles, the expression and its s-derivative, then the node's mask."""
    e = spec.expr
    lines = ["    sigma = tl.dot(q, kT, input_precision=PREC) * qk_scale",
             "    inb = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)"]  # fmt: skip
    lines += _loads(spec, "    ") + _indices("    ")
    lines += [f"    x = {code(e)}", f"    g = tl.where(inb, {code(sm.derivative(e, 's'))}, 0.0)",
              f"    s = tl.where(x == float(\"-inf\"), x, tl.maximum(x * 1.4426950408889634, {-FMAX!r}))"]  # fmt: skip
    return "\n".join(lines) + "\n" + bias_lines


def grad_function(spec: ModSpec) -> str:
    """``_mod_grads``: dS·∂m/∂tK stored for each extra that needs a gradient (called from the dQ kernel)."""
    e = spec.expr
    n = len(spec.booleans)
    grads = [k for k, need in enumerate(spec.grads) if need]
    params = _params(n) + "".join(f" DT{k}, dt{k}sb, dt{k}sh, dt{k}sm, dt{k}sn," for k in grads)
    lines = ["", "", "@triton.jit",
             f"def _mod_grads(ds, sigma, offs_m, offs_n, b, h, LQ, LK,{params} TRANS: tl.constexpr = False):",
             "    inb = (offs_m[:, None] < LQ) & (offs_n[None, :] < LK)"]  # fmt: skip
    lines += _loads(spec, "    ") + _indices("    ")
    for k in grads:
        ptr = f"DT{k} + b * dt{k}sb + h * dt{k}sh + offs_m[:, None] * dt{k}sm + offs_n[None, :] * dt{k}sn"
        lines.append(f"    tl.store({ptr}, ds * ({code(sm.derivative(e, f't{k}'))}), mask=inb)")
    return "\n".join(lines) + "\n"


def holes(spec: ModSpec | None, plain_kernel: str) -> dict[str, str]:
    """Every hole of ``templates.ATTENTION`` for this modification (None: the plain kernels): the argument lists
    from the template's one signature plus the extras, and the kernel, gradient and helper holes."""
    if spec is None:
        empty = ("MOD", "GRAD_PARAMS", "MOD_GRAD_CALL", "MOD_FUNCS")
        return {"KERNEL": plain_kernel, **dict.fromkeys(empty, ""), **templates.signature("", "")}
    bias = plain_kernel.split("\n", 1)[1].replace("\n    g = 1.0\n    sigma = s", "")
    n = len(spec.booleans)
    grads = [k for k, need in enumerate(spec.grads) if need]
    grad_params = "".join(f" DT{k}, dt{k}sb, dt{k}sh, dt{k}sm, dt{k}sn," for k in grads)
    call = ""
    if grads:
        call = f"            _mod_grads(ds, sigma, offs_m, offs_n, b, h, LQ, LK,{_params(n)}{grad_params})"
    return {
        "KERNEL": kernel(spec, bias),
        "MOD": _params(n),
        "GRAD_PARAMS": grad_params,
        "MOD_GRAD_CALL": call,
        "MOD_FUNCS": TANH + (grad_function(spec) if grads else ""),
        **templates.signature(_params(n), _params(n, trans=True)),
    }
