"""The verifier: run between passes; valid IR in means every check here holds.

Checks SSA (defined once, before use), that generic ops resolve and fit their schema, that it.transform nodes carry
their family's attributes and roles, that sizes only use declared symbols, and that weights match their tensors.
"""

from __future__ import annotations

import torch

from ..errors import ItnetError
from . import treespec
from .core import Program, Value, iter_values
from .ops import resolve_op
from .parser import valid_name
from .printer import print_node
from .types import TensorType, free_symbols


def verify(prog: Program) -> None:
    defined: set[Value] = set()
    names: set[str] = set()
    declared = set(prog.symbols)

    def define(v: Value, where: str) -> None:
        if v.name in names:
            raise ItnetError(f"%{v.name} is defined twice ({where}); rename one of them")
        bad = {s.name for s in free_symbols(v.type)} - declared
        if bad:
            raise ItnetError(f"%{v.name} uses undeclared size symbol(s) {sorted(bad)}; add a 'symbol' line")
        names.add(v.name)
        defined.add(v)

    for v in prog.inputs:
        define(v, "input")
    for w in prog.weights:
        define(w.value, w.kind)
        _check_weight(prog, w.key, w.value)
    for node in prog.nodes:
        line = print_node(node)
        for v in node.input_values():
            if v not in defined:
                raise ItnetError(f"uses %{v.name} before it is defined: {line}", layer=node.layer or None)
        try:
            _check_node(node)
        except ValueError as e:
            raise ItnetError(f"{e}: {line}", layer=node.layer or None) from None
        for v in node.outputs:
            define(v, line)
    for v in iter_values(prog.outputs):
        if v not in defined:
            raise ItnetError(f"output %{v.name} is not defined")
    _check_signatures(prog)


def _check_signatures(prog: Program) -> None:
    """The recorded call and result structures hold as many leaves as the program has inputs and outputs."""
    for which, spec, count in (("in", prog.in_spec, len(prog.inputs)), ("out", prog.out_spec, len(prog.outputs))):
        if spec is None:
            continue
        leaves = treespec.num_leaves(spec)
        if leaves != count:
            what = "inputs" if which == "in" else "outputs"
            raise ItnetError(f"'signature {which}' holds {leaves} leaves but the program has {count} {what}")


def _check_node(node) -> None:
    if node.is_transform:
        if node.attrs is None:
            raise ValueError("it.transform needs a family attribute record")
        if node.args:
            raise ValueError("it.transform takes its inputs by role name only")
        roles = node.attrs.roles
        names = [r.rstrip("?") for r in roles]
        extra = set(node.kwargs) - set(names)
        if extra:
            raise ValueError(f"unknown input role(s) {sorted(extra)} for family {node.attrs.family}")
        for r in roles:
            if not r.endswith("?") and r not in node.kwargs:
                raise ValueError(f"missing input role '{r}'")
        node.attrs.check(node)
        return
    if node.attrs is not None:
        raise ValueError("only it.transform carries family attributes")
    fn = resolve_op(node.op)
    if isinstance(fn, torch._ops.OpOverload):
        schema = fn._schema
        names = {a.name for a in schema.arguments}
        if len(node.args) > len(schema.arguments):
            raise ValueError(f"{len(node.args)} arguments but the schema takes {len(schema.arguments)}")
        bad = set(node.kwargs) - names
        if bad:
            raise ValueError(f"unknown keyword argument(s) {sorted(bad)}")


def _check_weight(prog: Program, key: str, v: Value) -> None:
    parts = key.split(".")
    reserved = parts[0].startswith("_itnet")  # the backends' own buffers
    if reserved or not all(
        (p.isascii() and p.isdigit()) or (valid_name(p) and not hasattr(torch.nn.Module, p)) for p in parts
    ):
        raise ItnetError(
            f"weight key {key[:80]!r} of %{v.name} is not a module path (dotted identifiers that are not nn.Module "
            "attributes); re-run itnet convert"
        )
    if isinstance(v.type, TensorType) and not all(d.is_Integer for d in v.type.shape):
        raise ItnetError(f"weight '{key}' has the symbolic type {v.type}; weights have static shapes")
    if not prog.tensors:
        return
    t = prog.tensors.get(key)
    if t is None:
        raise ItnetError(f"weight '{key}' of %{v.name} is missing from the weights file; re-run itnet convert")
    if isinstance(v.type, TensorType) and (t.dtype != v.type.dtype or list(t.shape) != [int(d) for d in v.type.shape]):
        raise ItnetError(f"weight '{key}' is {t.dtype} {list(t.shape)} but the IR says {v.type}; re-run itnet convert")
