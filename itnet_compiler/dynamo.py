"""``torch.compile(model, backend="itnet")``: every graph dynamo captures, converted to the IR and built by itnet.

    compiled = torch.compile(model, backend="itnet")                    # default target (torch-cpu; torch-cuda
    compiled = torch.compile(model, backend="itnet", options={          #   when the graph's tensors are on a GPU)
        "backend": "triton",            # itc.build backend or target name: torch, triton, torch-cpu, torch-cuda
        "plan": {"encoder.*": "fused"}, # itc.build plan: layer globs -> lowering (each graph takes the entries
                                        #   that match its layers), or a plan file
        "error_budget": 1e-3,           # let the cost model pick approximate lowerings within this relative error
        "fallback": True,               # False: a graph itnet refuses raises instead of running as captured
    })

The backend is registered under the ``torch_dynamo_backends`` entry point, so ``backend="itnet"`` works without
importing this package first.

How a captured graph runs. Dynamo hands over a torch-level FX graph (with ``inline_inbuilt_nn_modules``, the default,
parameters and buffers are graph inputs). It goes through AOTAutograd (``aot_autograd``), which functionalises it
and, when an input requires grad, splits it into a forward and a backward ATen graph:

- the forward graph (or the inference graph under ``torch.no_grad``) is imported with ``frontend.graph`` (no
  re-export), recognised (``it.transform`` nodes, see below), planned and built with ``itc.build``; the compiled
  callable runs the built module.
- the backward graph runs as AOTAutograd traced it, op by op in torch: it reads the activations the itnet forward
  saved, and gradients reach the real parameters because they are the graph's inputs. itnet's own backward kernels
  (Triton) are not used on this path. Approximate lowerings (a plan or an ``error_budget``) change the forward
  only; the backward is that of the exact function.

What is recognised in AOTAutograd graphs: convolutions (``aten.convolution``) always; SDPA (the fused ATen kernel it
dispatches to) in inference graphs, while training graphs save its logsumexp for the backward and keep it a generic
op run by torch; hand-written softmax chains not at all, since AOTAutograd decomposes ``matmul`` into expand, clone,
``_unsafe_view`` and ``bmm``. What is not recognised still runs, exactly, as generic ops of the built module.

Graph breaks: dynamo calls the backend once per captured subgraph; each is converted separately and the Python in
between runs as usual. A graph the converter refuses (an op outside the allow-list, a custom op, an output it cannot
hold) runs as captured, with a ``UserWarning`` naming the reason and a ``Fallback`` record appended to
``fallbacks``; with ``options={"fallback": False}`` the ``ItnetError`` is raised instead (dynamo reports it as
``torch._dynamo.exc.BackendCompilerFailed``, whose ``inner_exception`` is the ``ItnetError``). Every graph built by
itnet is recorded in ``graphs`` (its program and module); ``reset()`` clears both lists.

Shapes: each graph is built for the sizes it was captured with. When a call brings new sizes, dynamo recompiles:
with ``dynamic=False`` a new static graph; by default (automatic dynamic shapes) a graph whose sizes are symbols,
which the importer keeps as IR symbols (torch's names, unbounded) and the built module binds at each call.
"""

from __future__ import annotations

import fnmatch
import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from .api import build
from .backends.torch.codegen import ItnetModule
from .errors import ItnetError, first_line
from .frontend.graph import import_graph
from .ir.core import Program
from .ir.lowering import AUTO, names
from .passes import pipeline
from .passes.plan import parse_plan

OPTIONS = ("backend", "plan", "error_budget", "fallback")


@dataclass(frozen=True)
class Fallback:
    """A captured graph that ran as captured instead of through itnet, and why."""

    graph: str  # "forward 3", "inference 0": the kind of AOTAutograd graph and its number in this process
    reason: str  # the ItnetError's one line


@dataclass(frozen=True)
class Compiled:
    """A captured graph that itnet built: its planned program (``module.program``) and the module that runs it."""

    graph: str
    module: ItnetModule

    @property
    def program(self) -> Program:
        return self.module.program


fallbacks: list[Fallback] = []
graphs: list[Compiled] = []


def reset() -> None:
    """Forget the records of earlier compilations (``fallbacks``, ``graphs``); pair with ``torch._dynamo.reset()``."""
    fallbacks.clear()
    graphs.clear()


@dataclass(frozen=True)
class _Options:
    backend: str | None = None  # None: torch-cuda when the graph's tensors are on a GPU, else torch-cpu
    plan: dict[str, str] | str | Path | None = None
    error_budget: float | None = None
    fallback: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, object] | None) -> _Options:
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ItnetError(
                f"unknown torch.compile option(s) {unknown} for backend 'itnet'; the options are {', '.join(OPTIONS)}"
            )
        backend = options.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise ItnetError(f"torch.compile option 'backend' must be a backend or target name, got {backend!r}")
        budget = options.get("error_budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
            raise ItnetError(f"torch.compile option 'error_budget' must be a relative error >= 0, got {budget!r}")
        fallback = options.get("fallback", True)
        if not isinstance(fallback, bool):
            raise ItnetError(f"torch.compile option 'fallback' must be True or False, got {fallback!r}")
        plan = options.get("plan")
        if plan is not None and not isinstance(plan, (dict, str, Path)):
            raise ItnetError(f"torch.compile option 'plan' must be a dict of layer globs or a plan file, got {plan!r}")
        return cls(backend, plan, None if budget is None else float(budget), fallback)


_counter = itertools.count()  # numbers the captured graphs of this process, for the records and warnings


def itnet(gm: fx.GraphModule, example_inputs: Sequence[object], options: Mapping[str, object] | None = None):
    """The dynamo backend: AOTAutograd around ``gm``, itnet for its forward graph, torch for its backward graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    opts = _Options.parse(options)

    def forward(fw: fx.GraphModule, inputs: Sequence[object]) -> Callable:
        return _compile_graph(fw, inputs, opts, "forward")

    def inference(fw: fx.GraphModule, inputs: Sequence[object]) -> Callable:
        return _compile_graph(fw, inputs, opts, "inference")

    def backward(bw: fx.GraphModule, inputs: Sequence[object]) -> Callable:
        return make_boxed_func(bw.forward)

    return aot_autograd(fw_compiler=forward, bw_compiler=backward, inference_compiler=inference)(gm, example_inputs)


def _compile_graph(gm: fx.GraphModule, inputs: Sequence[object], opts: _Options, kind: str) -> Callable:
    """Convert, recognise, plan and build one AOTAutograd graph; on failure fall back to the graph itself (or raise,
    with ``fallback=False``)."""
    from functorch.compile import make_boxed_func
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    name = f"{kind} {next(_counter)}"
    # AOTAutograd calls its compilers inside its FakeTensorMode; the passes compute on real tensors (constant masks).
    try:
        with unset_fake_temporarily():
            prog = pipeline.run(import_graph(gm), phases=("recognise",))
            plan = _plan_for(prog, opts.plan)
            module = build(prog, opts.backend or _default_backend(inputs), plan, opts.error_budget)
    except Exception as e:  # an ItnetError, or a bug of the compiler: either way the user's program must run
        if not opts.fallback:
            raise
        reason = first_line(e) if isinstance(e, ItnetError) else f"internal error, {type(e).__name__}: {first_line(e)}"
        fallbacks.append(Fallback(name, reason))
        warnings.warn(
            f"itnet could not compile captured graph {name} ({reason}); it runs as captured by torch",
            stacklevel=2,
        )
        return make_boxed_func(gm.forward)
    graphs.append(Compiled(name, module))
    return make_boxed_func(module.forward)


def _plan_for(prog: Program, plan: dict[str, str] | str | Path | None) -> dict[str, str] | str | Path | None:
    """The entries of a dict plan that apply to this graph: each captured graph holds part of the model (graph
    breaks, or a forward without the SDPA that a training graph keeps generic), and ``apply_plan`` refuses entries
    that match no layer. A plan file is passed on whole."""
    if not isinstance(plan, dict):
        return plan
    specs = parse_plan(plan)
    keep = {}
    for pattern, spec in specs.items():
        for node in prog.transforms:
            hit = fnmatch.fnmatchcase(node.layer, pattern) or pattern == node.outputs[0].name
            if hit and (spec.name == AUTO or spec.name in names(node.family)):
                keep[pattern] = plan[pattern]
                break
    return keep or None


def _default_backend(inputs: Sequence[object]) -> str:
    cuda = any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in inputs)
    return "torch-cuda" if cuda else "torch"
