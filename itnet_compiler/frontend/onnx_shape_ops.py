"""Shape, indexing and reduction ops of the ONNX importer (see ``onnx_ops``)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ItnetError
from .onnx_ops import OPS, Static, _t, ints, op


def _axes(n, given, rank: int | None = None) -> list[int] | None:
    """Axes from an input (opset 13+/18+) or the older attribute."""
    axes = ints(given) if given is not None else n.attr("axes")
    if axes is None:
        return None
    return [a % rank if rank is not None and a < 0 else a for a in axes]


@op("Shape")
def _shape(n, x):
    shape = list(x.shape) if isinstance(x, torch.Tensor) else list(x.arr.shape)
    start, end = n.attr("start", 0), n.attr("end", None)
    return Static(np.array(shape[start:end] if end is not None else shape[start:], dtype=object))


@op("Size")
def _size(n, x):
    return Static(np.array(x.numel(), dtype=object))


@op("Reshape")
def _reshape(n, x, shape):
    want = ints(shape)
    if not n.attr("allowzero", 0):
        want = [x.shape[i] if (not isinstance(d, torch.SymInt) and d == 0) else d for i, d in enumerate(want)]
    if isinstance(x, Static):
        return Static(x.arr.reshape([int(d) for d in want]))
    return x.reshape(want)


@op("Flatten")
def _flatten(n, x):
    axis = n.attr("axis", 1) % max(x.dim(), 1)
    return x.reshape(*([_prod(x.shape[:axis])] if axis else [1]), -1)


def _prod(dims) -> object:
    out = 1
    for d in dims:
        out = out * d
    return out


@op("Transpose")
def _transpose(n, x):
    perm = n.attr("perm") or list(range(x.dim()))[::-1]
    return x.permute(*perm)


@op("Squeeze")
def _squeeze(n, x, axes=None):
    rank = x.arr.ndim if isinstance(x, Static) else x.dim()
    ax = _axes(n, axes, rank)
    if isinstance(x, Static):
        return Static(x.arr.squeeze(tuple(ax)) if ax else x.arr.squeeze())
    return x.squeeze(tuple(ax)) if ax else x.squeeze()


@op("Unsqueeze")
def _unsqueeze(n, x, axes=None):
    rank = (x.arr.ndim if isinstance(x, Static) else x.dim()) + len(ints(axes) if axes is not None else n.attr("axes"))
    ax = sorted(_axes(n, axes, rank))
    if isinstance(x, Static):
        arr = x.arr
        for a in ax:
            arr = np.expand_dims(arr, a)
        return Static(arr)
    for a in ax:
        x = x.unsqueeze(a)
    return x


@op("Concat")
def _concat(n, *xs):
    axis = n.attr("axis", 0)
    xs = [x for x in xs if x is not None]
    if all(isinstance(x, Static) for x in xs):
        return Static(np.concatenate([x.arr for x in xs], axis=axis))
    ref = next(x for x in xs if isinstance(x, torch.Tensor))
    ts = [_t(x, ref) for x in xs]
    return torch.cat([t for t in ts if t.numel() or t.dim() == ref.dim()], dim=axis)


@op("Split")
def _split(n, x, split=None, *_):
    axis = n.attr("axis", 0)
    sizes = ints(split) if split is not None else n.attr("split")
    if sizes is None:
        parts = n.attr("num_outputs", len(n.outputs))
        total = x.shape[axis]
        step = -(-total // parts)
        sizes = [min(step, total - i * step) for i in range(parts)]
    return list(torch.split(x, list(sizes), dim=axis))


@op("Slice")
def _slice(n, x, starts=None, ends=None, axes=None, steps=None):
    starts = ints(starts) if starts is not None else n.attr("starts")
    ends = ints(ends) if ends is not None else n.attr("ends")
    rank = x.arr.ndim if isinstance(x, Static) else x.dim()
    axes = ints(axes) if axes is not None else n.attr("axes", list(range(len(starts))))
    steps = ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * rank
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        big = 1 << 62
        s = None if (not isinstance(s, torch.SymInt) and abs(s) >= big) else s
        e = None if (not isinstance(e, torch.SymInt) and abs(e) >= big) else e
        if st < 0:
            if isinstance(x, Static):
                index[a % rank] = slice(s, e, st)
                continue
            size = x.shape[a % rank]
            lo = -1 if e is None else e
            x = torch.flip(x, [a % rank])
            s2 = 0 if s is None else size - 1 - (s % size if s < 0 else min(s, size - 1))
            e2 = size if lo == -1 else size - 1 - (lo % size if lo < 0 else lo)
            index[a % rank] = slice(s2, e2, -st)
        else:
            index[a % rank] = slice(s, e, st)
    if isinstance(x, Static):
        return Static(x.arr[tuple(index)])
    return x[tuple(index)]


@op("Gather")
def _gather(n, x, idx):
    axis = n.attr("axis", 0)
    if isinstance(x, Static) and isinstance(idx, Static):
        return Static(np.take(x.arr, idx.arr.astype(np.int64), axis=axis))
    if isinstance(x, Static):
        x = _t(x)
    i = _t(idx).long()
    i = torch.where(i < 0, i + x.shape[axis], i)
    out = torch.index_select(x, axis, i.reshape(-1))
    return out.reshape(*x.shape[:axis], *i.shape, *x.shape[axis + 1 :])


@op("GatherElements")
def _gather_el(n, x, idx):
    axis = n.attr("axis", 0)
    i = _t(idx).long()
    return torch.gather(x, axis, torch.where(i < 0, i + x.shape[axis], i))


@op("Expand")
def _expand(n, x, shape):
    want = ints(shape)
    x = _t(x)
    rank = max(len(want), x.dim())
    x = x.reshape(*([1] * (rank - x.dim())), *x.shape)
    want = [1] * (rank - len(want)) + want
    return x.expand(*[s if (isinstance(w, int) and w == 1) else w for s, w in zip(x.shape, want, strict=True)])


@op("Tile")
def _tile(n, x, reps):
    return x.repeat(*ints(reps))


@op("ConstantOfShape")
def _const_of_shape(n, shape):
    from onnx import numpy_helper

    value = n.attrs.get("value")
    arr = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    fill = torch.from_numpy(arr.copy()).reshape(())
    return torch.full(ints(shape), fill.item(), dtype=fill.dtype)


@op("Range")
def _range(n, start, limit, delta):
    if all(isinstance(v, Static) for v in (start, limit, delta)):
        s, e, d = (v.arr.reshape(()).item() for v in (start, limit, delta))
        return torch.arange(s, e, d, dtype=torch.int64 if start.arr.dtype.kind in "iuO" else torch.float32)
    s, e, d = (_t(v) for v in (start, limit, delta))
    return torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype)


@op("Trilu")
def _trilu(n, x, k=None):
    k = int(ints(k)[0]) if k is not None else 0
    return torch.triu(x, k) if n.attr("upper", 1) else torch.tril(x, k)


@op("CumSum")
def _cumsum(n, x, axis):
    a = int(ints(axis)[0])
    if n.attr("reverse", 0):
        x = torch.flip(x, [a])
    out = torch.cumsum(x, a)
    if n.attr("exclusive", 0):
        out = out - x
    return torch.flip(out, [a]) if n.attr("reverse", 0) else out


@op("Pad")
def _pad(n, x, pads=None, value=None, axes=None):
    p = ints(pads) if pads is not None else n.attr("pads")
    rank = x.dim()
    ax = ints(axes) if axes is not None else list(range(rank))
    half = len(p) // 2
    per = {a % rank: (p[i], p[i + half]) for i, a in enumerate(ax)}
    flat = []
    for a in reversed(range(rank)):
        flat += list(per.get(a, (0, 0)))
    while len(flat) > 2 and flat[-2:] == [0, 0]:  # torch pads the innermost dims only: drop unpadded outer ones
        flat = flat[:-2]
    mode = n.attr("mode", "constant")
    fill = float(_t(value).item()) if value is not None else n.attr("value", 0.0)
    if mode == "constant":
        return torch.nn.functional.pad(x, flat, value=fill)
    return torch.nn.functional.pad(x, flat, mode={"edge": "replicate", "wrap": "circular"}.get(mode, mode))


@op("GatherND")
def _gather_nd(n, x, idx):
    b = n.attr("batch_dims", 0)
    i = _t(idx).long()
    k = i.shape[-1]
    lead = x.shape[:b]
    flat_x = x.reshape(-1, *x.shape[b:])  # [prod(batch), ...]
    flat_i = i.reshape(flat_x.shape[0] if b else 1, -1, k)
    dims = x.shape[b : b + k]
    lin = torch.zeros(flat_i.shape[:2], dtype=torch.long)
    for j in range(k):
        lin = lin * dims[j] + torch.where(flat_i[..., j] < 0, flat_i[..., j] + dims[j], flat_i[..., j])
    rows = flat_x.reshape(flat_x.shape[0] if b else 1, -1, *x.shape[b + k :])
    out = torch.stack([rows[r][lin[r]] for r in range(rows.shape[0])]) if b else rows[0][lin[0]]
    return out.reshape(*lead, *i.shape[b:-1], *x.shape[b + k :])


@op("Einsum")
def _einsum(n, *xs):
    return torch.einsum(n.attr("equation"), *xs)


@op("TopK")
def _topk(n, x, k):
    v, i = torch.topk(x, int(ints(k)[0]), dim=n.attr("axis", -1), largest=bool(n.attr("largest", 1)),
                      sorted=bool(n.attr("sorted", 1)))  # fmt: skip
    return v, i


def _reduce(fn):
    def run(n, x, axes=None):
        ax = _axes(n, axes, x.dim())
        keep = bool(n.attr("keepdims", 1))
        if not ax:
            if n.attr("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        return fn(x, ax, keep)

    return run


OPS["ReduceSum"] = _reduce(lambda x, a, k: torch.sum(x, a, keepdim=k))
OPS["ReduceMean"] = _reduce(lambda x, a, k: torch.mean(x, a, keepdim=k))
OPS["ReduceMax"] = _reduce(lambda x, a, k: torch.amax(x, a, keepdim=k))
OPS["ReduceMin"] = _reduce(lambda x, a, k: torch.amin(x, a, keepdim=k))
OPS["ReduceProd"] = _reduce(lambda x, a, k: _prod_reduce(x, a, k))
OPS["ReduceL2"] = _reduce(lambda x, a, k: torch.sqrt(torch.sum(x * x, a, keepdim=k)))
OPS["ReduceL1"] = _reduce(lambda x, a, k: torch.sum(x.abs(), a, keepdim=k))
OPS["ReduceSumSquare"] = _reduce(lambda x, a, k: torch.sum(x * x, a, keepdim=k))
OPS["ReduceLogSumExp"] = _reduce(lambda x, a, k: torch.logsumexp(x, a, keepdim=k))


def _prod_reduce(x, axes, keep):
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, a, keepdim=keep)
    return x


def _arg(fn):
    def run(n, x):
        axis, keep = n.attr("axis", 0), bool(n.attr("keepdims", 1))
        if n.attr("select_last_index", 0):
            flipped = torch.flip(x, [axis])
            return x.shape[axis] - 1 - fn(flipped, dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)

    return run


OPS["ArgMax"] = _arg(torch.argmax)
OPS["ArgMin"] = _arg(torch.argmin)


@op("Softmax", "LogSoftmax")
def _softmax(n, x):
    axis = n.attr("axis", -1 if n.opset >= 13 else 1)
    if n.opset < 13:  # softmax over the flattened trailing dims
        shape = x.shape
        x = x.reshape(*shape[:axis], -1)
        out = torch.softmax(x, -1) if n.op_type == "Softmax" else torch.log_softmax(x, -1)
        return out.reshape(shape)
    return torch.softmax(x, axis) if n.op_type == "Softmax" else torch.log_softmax(x, axis)


@op("MatMul")
def _matmul(n, a, b):
    return torch.matmul(_t(a), _t(b))


@op("Gemm")
def _gemm(n, a, b, c=None):
    a = a.t() if n.attr("transA", 0) else a
    b = b.t() if n.attr("transB", 0) else b
    out = torch.matmul(a, b) * n.attr("alpha", 1.0)
    if c is not None:
        out = out + n.attr("beta", 1.0) * _t(c, out)
    return out


def unsupported(n, what: str) -> ItnetError:
    return ItnetError(f"node '{n.name}' ({n.op_type}): {what} is not imported")


@op("Scan")
def _scan(n, *args):
    """The body once per step (a loop at the example's length: generic ops, exact). Bodies that read values of
    the enclosing graph are refused."""
    from .onnx_import import OnnxModule, body_model

    if "_body" not in n.attrs:
        n.attrs["_body"] = OnnxModule(body_model(n))
    body = n.attrs["_body"]
    m = n.attr("num_scan_inputs")
    states, xs = list(args[: len(args) - m]), [_t(x) for x in args[len(args) - m :]]
    in_axes = list(n.attr("scan_input_axes") or [0] * m)
    in_dirs = list(n.attr("scan_input_directions") or [0] * m)
    steps = xs[0].shape[in_axes[0]]
    k = len(body.output_names) - len(states)
    out_axes = list(n.attr("scan_output_axes") or [0] * k)
    out_dirs = list(n.attr("scan_output_directions") or [0] * k)
    ys: list[list] = [[] for _ in range(k)]
    for t in range(steps):
        sl = [x.select(a, steps - 1 - t if d else t) for x, a, d in zip(xs, in_axes, in_dirs, strict=True)]
        res = body(*[_t(s) for s in states], *sl)
        res = list(res) if isinstance(res, tuple) else [res]
        states = res[: len(states)]
        for i, y in enumerate(res[len(states) :]):
            ys[i].append(y)
    outs = [torch.stack(y[::-1] if d else y, dim=a) for y, a, d in zip(ys, out_axes, out_dirs, strict=True)]
    return (*states, *outs)
