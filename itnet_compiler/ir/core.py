"""The IR: one node type, SSA values, a flat list of equations.

A ``Program`` holds its inputs (the flattened user inputs), its weights (parameters, buffers and constants, each a
named tensor of the bundle), a list of ``Node`` equations in topological order, and its outputs. A node is
``outputs = op(args, kwargs) {attrs}``: ``op`` is ``it.transform`` or the qualified name of a generic op
(``aten.linear.default``, ``operator.mul``); ``attrs`` is the typed family attribute record for ``it.transform``
and ``None`` otherwise. ``layer`` is the module path the node came from.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .types import TensorType, Type

if TYPE_CHECKING:
    from .families import FamilyAttrs

TRANSFORM = "it.transform"


@dataclass(eq=False)
class Value:
    """An SSA value. Identity matters: two values are the same only if they are the same object."""

    name: str
    type: Type

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


# An argument is a literal, a Value, or a (nested) list of those.
Arg = object


@dataclass(eq=False)
class Node:
    op: str
    args: list[Arg]
    kwargs: dict[str, Arg]
    outputs: list[Value]
    attrs: FamilyAttrs | None = None
    layer: str = ""

    @property
    def is_transform(self) -> bool:
        return self.op == TRANSFORM

    @property
    def name(self) -> str:
        """The layer name of a transform (its module path), else the first output's SSA name."""
        return self.layer or (self.outputs[0].name if self.outputs else self.op)

    @property
    def family(self) -> str | None:
        return self.attrs.family if self.attrs is not None else None

    @property
    def lowering(self) -> str | None:
        """The lowering spec as text (``montecarlo:samples=128``); ``attrs.lowering`` is the typed spec."""
        return str(self.attrs.lowering) if self.attrs is not None else None

    def input_values(self) -> list[Value]:
        return list(iter_values((self.args, self.kwargs)))

    def replace_uses(self, mapping: dict[Value, Arg]) -> None:
        self.args = [substitute(a, mapping) for a in self.args]
        self.kwargs = {k: substitute(v, mapping) for k, v in self.kwargs.items()}


@dataclass(eq=False)
class Weight:
    """A named tensor of the program: ``kind`` is param (trainable), buffer or const."""

    value: Value
    key: str
    kind: str


@dataclass(eq=False)
class Program:
    inputs: list[Value] = field(default_factory=list)
    weights: list[Weight] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[Arg] = field(default_factory=list)
    # Pytree structure of the original call and result, as JSON-able data (see ir/treespec.py).
    in_spec: object = None
    out_spec: object = None
    # Symbol name -> [min, max] (max None = unbounded), from torch.export range constraints.
    symbols: dict[str, list[int | None]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Free-form JSON-able facts kept in the bundle's meta.json (not in the text form): e.g. "source", the model spec
    # and example inputs that ``itnet run --check`` rebuilds the source model from.
    meta: dict[str, object] = field(default_factory=dict)
    # Factors that approximate lowerings fitted on calibration inputs (``itc.calibrate``), "<layer>::<name>" -> tensor;
    # ``meta["fitted"]`` says per layer what they are. Saved as fitted.safetensors; a build reuses them.
    fitted: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def transforms(self) -> list[Node]:
        return [n for n in self.nodes if n.is_transform]

    def generic_nodes(self) -> list[Node]:
        return [n for n in self.nodes if not n.is_transform]

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from (w.value for w in self.weights)
        for n in self.nodes:
            yield from n.outputs

    def users(self) -> dict[Value, list[Node]]:
        """value -> nodes that read it (outputs are not counted; see ``output_ids``)."""
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.input_values():
                out.setdefault(v, []).append(n)
        return out

    def output_ids(self) -> set[Value]:
        """The program's output values (a set: values hash by identity)."""
        return set(iter_values(self.outputs))

    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def weight_of(self, value: Value) -> Weight | None:
        for w in self.weights:
            if w.value is value:
                return w
        return None

    def clone(self) -> Program:
        """A deep copy of the structure; tensors are shared (passes never mutate them in place)."""
        tensors, fitted = self.tensors, self.fitted
        self.tensors, self.fitted = {}, {}
        try:
            dup = copy.deepcopy(self)
        finally:
            self.tensors, self.fitted = tensors, fitted
        dup.tensors, dup.fitted = dict(tensors), dict(fitted)
        return dup

    def __str__(self) -> str:
        from .printer import print_program

        return print_program(self)

    def save(self, path: str) -> None:
        from .bundle import save

        save(self, path)


def iter_values(arg: Arg) -> Iterator[Value]:
    if isinstance(arg, Value):
        yield arg
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            yield from iter_values(a)
    elif isinstance(arg, dict):
        for a in arg.values():
            yield from iter_values(a)


def substitute(arg: Arg, mapping: dict[Value, Arg]) -> Arg:
    if isinstance(arg, Value):
        return mapping.get(arg, arg)
    if isinstance(arg, list):
        return [substitute(a, mapping) for a in arg]
    if isinstance(arg, tuple):
        return tuple(substitute(a, mapping) for a in arg)
    return arg


def tensor_type(v: Value) -> TensorType:
    if not isinstance(v.type, TensorType):
        raise TypeError(f"%{v.name} is not a tensor")
    return v.type
