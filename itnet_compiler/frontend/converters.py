"""Module converters: capture a whole module as IR nodes the converter writes, instead of tracing through it.

Some layers are best seen whole (an LSTM, a Mamba mixer, a user's own block). ``register_converter(cls)`` registers
``fn(ctx, module, *inputs) -> Value | list[Value]`` for a module class. During export such a module's forward is
replaced by one opaque op ``itnet::capture`` (its output shapes come from running the original forward on fake
tensors), and the importer then asks the converter to emit the nodes for it. Inputs arrive as IR Values in the order
of the module call's flattened tensor arguments; the converter must return the flattened outputs in order (``None``
leaves of the module's result, such as an unused cache slot, are neither passed through the op nor returned).

A forward that cannot run on fake tensors with symbolic sizes (a Python loop over time specialises the length; torch's
LSTM decomposition does the same) registers ``shapes``: a function that returns what the forward would return as empty
tensors, which the capture op's fake implementation calls instead of the forward.

A layer that comes under many class names (a model family's copies of one mixer, a user's renamed copy) registers a
structural converter instead: ``register_structural_converter(name, predicate, convert)``, where ``predicate(module)``
says from the module's parameters, submodules and attributes whether ``convert`` computes it exactly. Lookup takes the
class registry first (the nearest class in the MRO, so a user's ``register_converter`` always wins), then the
predicates, the latest registered first; a module no predicate accepts is traced as usual.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from ..errors import ItnetError
from ..ir.core import Node, Value
from ..ir.families import FamilyAttrs
from ..ir.types import Type

Converter = Callable[..., object]
Shapes = Callable[..., object]
# Keyed by class, or by a class's qualified name (``module.QualName``) for classes of optional libraries.
_REGISTRY: dict[type | str, Converter] = {}
_SHAPES: dict[type | str, Shapes] = {}
Predicate = Callable[[torch.nn.Module], bool]
_STRUCTURAL: dict[str, tuple[Predicate, Converter, Shapes | None]] = {}
_ACTIVE: dict[str, _Capture] = {}
_COUNTER = itertools.count()


def register_converter(
    cls: type[torch.nn.Module] | str, *, shapes: Shapes | None = None
) -> Callable[[Converter], Converter]:
    """Decorator: ``@register_converter(MyBlock)`` over ``def convert(ctx, module, *inputs)``.

    ``cls`` may be a qualified class name (``"transformers.models.mamba.modeling_mamba.MambaMixer"``), matched without
    importing it: converters for classes of optional, slow-to-import libraries cost nothing until such a model is seen.

    ``shapes(module, *args, **kwargs)``, when given, returns the forward's result as empty tensors of the right shapes
    and dtypes (``x.new_empty(...)``); export runs it on fake tensors in place of the forward.
    """

    def deco(fn: Converter) -> Converter:
        _REGISTRY[cls] = fn
        if shapes is None:
            _SHAPES.pop(cls, None)
        else:
            _SHAPES[cls] = shapes
        return fn

    return deco


def unregister_converter(cls: type[torch.nn.Module] | str) -> None:
    _REGISTRY.pop(cls, None)
    _SHAPES.pop(cls, None)


def register_structural_converter(
    name: str, predicate: Predicate, convert: Converter, *, shapes: Shapes | None = None
) -> Converter:
    """Convert every module for which ``predicate(module)`` is true with ``convert`` (and ``shapes``, as in
    ``register_converter``), whatever its class, unless its class has a converter of its own. ``name`` identifies the
    rule (registering a name again replaces it). The predicate runs on every module of a converted model, in eager
    mode: it must be cheap, must not raise, and must say False whenever ``convert`` would not be exact."""
    _STRUCTURAL.pop(name, None)
    _STRUCTURAL[name] = (predicate, convert, shapes)
    return convert


def unregister_structural_converter(name: str) -> None:
    _STRUCTURAL.pop(name, None)


def _key(module: torch.nn.Module) -> type | str | None:
    """The registry key for ``module``: the nearest class in its MRO registered by itself or by its qualified name."""
    for klass in type(module).__mro__:
        for key in (klass, f"{klass.__module__}.{klass.__qualname__}"):
            if key in _REGISTRY:
                return key
    return None


def _lookup(module: torch.nn.Module) -> tuple[Converter, Shapes | None] | None:
    """The converter for ``module`` and its ``shapes`` function: by class first, then by structure."""
    key = _key(module)
    if key is not None:
        return _REGISTRY[key], _SHAPES.get(key)
    for predicate, convert, shapes in reversed(_STRUCTURAL.values()):
        if predicate(module):
            return convert, shapes
    return None


def converter_for(module: torch.nn.Module) -> Converter | None:
    found = _lookup(module)
    return None if found is None else found[0]


def shapes_for(module: torch.nn.Module) -> Shapes | None:
    """The ``shapes`` function registered with the converter that ``converter_for`` picks, if any."""
    found = _lookup(module)
    return None if found is None else found[1]


@dataclass
class _Capture:
    module: torch.nn.Module
    path: str
    forward: Callable[..., object]
    converter: Converter
    shapes: Shapes | None = None
    in_spec: object = None
    leaves: list[object] = field(default_factory=list)
    out_spec: object = None
    out_none: list[bool] = field(default_factory=list)


@torch.library.custom_op("itnet::capture", mutates_args=())
def _capture_op(tensors: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    return _run_original(tensors, key)


@_capture_op.register_fake
def _(tensors: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    return _run_original(tensors, key, fake=True)


def _run_original(tensors: Sequence[torch.Tensor], key: str, fake: bool = False) -> list[torch.Tensor]:
    cap = _ACTIVE[key]
    it = iter(tensors)
    leaves = [next(it) if isinstance(x, torch.Tensor) else x for x in cap.leaves]
    args, kwargs = pytree.tree_unflatten(leaves, cap.in_spec)
    forward = functools.partial(cap.shapes, cap.module) if fake and cap.shapes is not None else cap.forward
    try:
        out = forward(*args, **kwargs)
    except ItnetError as e:
        if e.layer is not None:
            raise
        raise ItnetError(str(e), layer=cap.path) from None
    flat, cap.out_spec = pytree.tree_flatten(out)
    cap.out_none = [x is None for x in flat]  # None leaves (an unused cache slot) pass around the op
    flat = [x for x in flat if x is not None]
    bad = [type(x).__name__ for x in flat if not isinstance(x, torch.Tensor)]
    if bad:
        raise ItnetError(
            f"module converter capture returns non-tensor outputs ({bad}); return tensors only", layer=cap.path
        )
    return [x.clone() if any(x is t for t in tensors) else x for x in flat]


def is_capture_op(target: object) -> bool:
    return target is torch.ops.itnet.capture.default


@contextlib.contextmanager
def capturing(model: torch.nn.Module) -> Iterator[dict[str, _Capture]]:
    """Swap the forward of every module with a registered converter for the capture op, for one export."""
    swapped: list[tuple[torch.nn.Module, str]] = []
    mine: dict[str, _Capture] = {}
    for path, mod in model.named_modules():
        if any(path.startswith(p + ".") for _, p in swapped if p):
            continue
        found = _lookup(mod)
        if found is None:
            continue
        key = f"c{next(_COUNTER)}"
        cap = _Capture(mod, path, mod.forward, *found)
        mine[key] = _ACTIVE[key] = cap
        mod.forward = _make_forward(key, cap)
        swapped.append((mod, path))
    try:
        yield mine
    finally:
        for mod, _ in swapped:
            del mod.forward
        for key in mine:
            _ACTIVE.pop(key, None)


def _make_forward(key: str, cap: _Capture) -> Callable[..., object]:
    def forward(*args: object, **kwargs: object) -> object:
        leaves, cap.in_spec = pytree.tree_flatten((args, kwargs))
        cap.leaves = list(leaves)
        outs = iter(_capture_op([x for x in leaves if isinstance(x, torch.Tensor)], key))
        return pytree.tree_unflatten([None if none else next(outs) for none in cap.out_none], cap.out_spec)

    return forward


class ConverterContext:
    """What a converter may do: read weights of its module, emit generic ops and transforms, name output types."""

    def __init__(self, importer: object, cap: _Capture, out_types: list[Type]):
        self._imp = importer
        self.cap = cap
        self.layer = cap.path
        self.output_types = out_types
        self._n = itertools.count()

    def weight(self, name: str) -> Value:
        """The program value of the module's parameter or buffer ``name`` (e.g. ``weight_ih_l0``)."""
        key = f"{self.layer}.{name}" if self.layer else name
        for w in self._imp.prog.weights:
            if w.key == key:
                return w.value
        raise ItnetError(f"module has no parameter or buffer '{name}' in the exported program", layer=self.layer)

    def fresh(self, t: Type, hint: str = "v") -> Value:
        base = self.layer.replace(".", "_") or "root"
        if not (base[0].isalpha() or base[0] == "_"):
            base = f"m{base}"  # a Sequential's index ("0.kernel"): value names are identifiers
        return Value(f"{base}_{hint}{next(self._n)}", t)

    def op(self, op: str, args: list[object], kwargs: dict[str, object] | None, out_types: list[Type]) -> list[Value]:
        outs = [self.fresh(t) for t in out_types]
        self._imp.prog.nodes.append(Node(op, list(args), dict(kwargs or {}), outs, None, self.layer))
        return outs

    def transform(self, attrs: FamilyAttrs, inputs: dict[str, Value], out_types: list[Type]) -> list[Value]:
        outs = [self.fresh(t, "t") for t in out_types]
        self._imp.prog.nodes.append(Node("it.transform", [], dict(inputs), outs, attrs, self.layer))
        return outs


def expand_capture(importer: object, n: torch.fx.Node) -> list[Value]:
    tensors, key = n.args
    cap = _ACTIVE.get(key)
    if cap is None:
        raise ItnetError(f"capture {key} has no active converter; export and import must run together")
    inputs = [importer.arg(t, n) for t in tensors]
    vals = n.meta.get("val") or []
    out_types = [importer.type_of(v, n.name) for v in vals]
    ctx = ConverterContext(importer, cap, out_types)
    try:
        result = cap.converter(ctx, cap.module, *inputs)
    except ItnetError:
        raise
    except Exception as e:
        raise ItnetError(f"module converter failed ({type(e).__name__}: {e})", layer=cap.path) from e
    outs = [result] if isinstance(result, Value) else list(result)
    if len(outs) != len(out_types):
        raise ItnetError(
            f"module converter returned {len(outs)} outputs, the module returns {len(out_types)}", layer=cap.path
        )
    return outs
