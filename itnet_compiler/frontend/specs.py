"""Model specs for the CLI: ``path/file.py:factory``, ``package.module:factory`` and ``hf:ModelClass`` + config JSON.

A spec, its config, the example-input specs and the seed form a ``Source``: plain JSON that ``itnet convert`` keeps in
the bundle's meta and from which ``itnet run --check`` rebuilds the same model (seeded, so with the same weights).
Nothing is pickled. Example inputs are written ``name:shape[:dtype]`` (``input_ids:2x16:int64``, ``x:2xseq=32:f32``)
and dynamic sizes ``name:dim[=symbol[:min:max]]``; both become ``torch.export.Dim`` objects shared by symbol name.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import config as itnet_config
from ..errors import ItnetError, first_line
from ..ir.types import DTYPES

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_SYM_ENTRY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:=(\d+))?$")
_SUGGESTED_DIM = re.compile(r"(\w+) = Dim\('(\w+)'((?:, (?:min|max)=\d+)*)\)")
DEFAULT_SIZE = 16
SPEC_FORMS = "path/file.py:factory, package.module:factory, hf:ModelClass or model.onnx"


@dataclass(frozen=True)
class SymDim:
    """A symbolic entry of an input shape; ``example`` is the size of the example input (None: choose one)."""

    name: str
    example: int | None = None


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | SymDim, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class DynamicSpec:
    name: str
    axis: int
    symbol: str
    min: int | None = None
    max: int | None = None


@dataclass
class Source:
    """Everything needed to rebuild a model and its example inputs; stored as JSON in ``meta["source"]``."""

    spec: str
    config: dict | None = None
    config_path: str | None = None
    inputs: list[str] = field(default_factory=list)
    dynamic: list[str] = field(default_factory=list)
    seed: int = 0
    path: str | None = None  # the resolved file of a path/file.py:factory spec
    cwd: str | None = None  # where a package.module:factory spec was imported from
    # Symbol -> [min, max] adopted from torch.export's suggestions for symbols the user gave no range.
    ranges: dict[str, list[int | None]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Source:
        """A source recorded in a bundle's meta.json, every field type-checked (it is data from a file)."""
        bad = "the bundle's meta.json has a malformed 'source' entry"
        if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
            raise ItnetError(f"{bad}; re-run itnet convert")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        checks = {
            "config": lambda v: v is None or isinstance(v, dict),
            "config_path": lambda v: v is None or isinstance(v, str),
            "inputs": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "dynamic": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
            "path": lambda v: v is None or isinstance(v, str),
            "cwd": lambda v: v is None or isinstance(v, str),
            "ranges": lambda v: isinstance(v, dict),
        }
        for key, ok in checks.items():
            if key in known and not ok(known[key]):
                raise ItnetError(f"{bad} ({key!r} has the wrong type); re-run itnet convert")
        return cls(**known)


@dataclass
class Loaded:
    """A built model and the example call that ``itnet convert`` exports it with."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict
    dynamic_shapes: dict | None = None
    # Input name -> [low, high) of generated integer inputs (the program's run-time inputs use the same ranges).
    int_ranges: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- parsing the options


def parse_dtype(text: str) -> torch.dtype:
    """``float32``, ``int64``, ``bool`` (torch names) or the IR's ``f32``, ``i64``, ``b8``."""
    if text in DTYPES:
        return DTYPES[text]
    dtype = getattr(torch, text, None) if _IDENT.match(text) else None
    if not isinstance(dtype, torch.dtype):
        raise ItnetError(f"unknown dtype {text!r}; write e.g. float32, float16, bfloat16, int64, int32 or bool")
    return dtype


def parse_input(text: str) -> InputSpec:
    """``name:shape[:dtype]``; sizes are separated by ``x`` (or by commas when a symbol name contains an x)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not _IDENT.match(parts[0]) or not parts[1]:
        raise ItnetError(
            f"--input {text!r} is not name:shape:dtype; write e.g. input_ids:2x16:int64 or x:2xseq:float32"
        )
    name, shape_text = parts[0], parts[1]
    dtype = parse_dtype(parts[2]) if len(parts) == 3 else torch.float32
    entries = shape_text.split(",") if "," in shape_text else shape_text.split("x")
    shape: list[int | SymDim] = []
    for entry in entries:
        entry = entry.strip()
        if entry.isdigit():
            shape.append(int(entry))
            continue
        m = _SYM_ENTRY.match(entry)
        if not m:
            raise ItnetError(
                f"--input {text!r}: size {entry!r} is neither a number nor a symbol (seq or seq=32); "
                "write e.g. input_ids:2x16:int64"
            )
        shape.append(SymDim(m.group(1), int(m.group(2)) if m.group(2) else None))
    return InputSpec(name, tuple(shape), dtype)


def parse_dynamic(text: str) -> DynamicSpec:
    """``name:dim[=symbol[:min:max]]``, e.g. ``input_ids:1=seq:2:512``; min or max may be left empty."""
    head, _, sym_part = text.partition("=")
    name, colon, axis = head.partition(":")
    if not colon or not _IDENT.match(name) or not axis.strip().isdigit():
        raise ItnetError(f"--dynamic {text!r} is not name:dim[=symbol[:min:max]]; write e.g. input_ids:1=seq:2:512")
    axis_i = int(axis)
    if not sym_part:
        return DynamicSpec(name, axis_i, f"{name}_{axis_i}")
    fields = sym_part.split(":")
    bounds = fields[1:]
    if not _IDENT.match(fields[0]) or len(bounds) > 2 or not all(b.strip().isdigit() or not b for b in bounds):
        raise ItnetError(f"--dynamic {text!r}: expected symbol[:min:max] after '=', e.g. input_ids:1=seq:2:512")
    lo = int(bounds[0]) if bounds and bounds[0] else None
    hi = int(bounds[1]) if len(bounds) > 1 and bounds[1] else None
    if lo is not None and hi is not None and lo > hi:
        raise ItnetError(f"--dynamic {text!r}: min {lo} is larger than max {hi}")
    return DynamicSpec(name, axis_i, fields[0], lo, hi)


def read_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise ItnetError(f"config file {p} does not exist; pass a JSON file with --config")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ItnetError(f"config file {p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ItnetError(f"config file {p} must hold a JSON object of config keys")
    return data


# ---------------------------------------------------------------------------------------------- building the model


def load_source(src: Source) -> Loaded:
    """Build the model of ``src`` (seeded by ``src.seed``) and its example inputs, in eval mode."""
    torch.manual_seed(src.seed)
    if src.spec.endswith(".onnx"):  # an ONNX file: its graph computed by the importer's op table (no code runs)
        from .onnx_import import import_onnx

        if src.inputs or src.dynamic:
            raise ItnetError("an ONNX model declares its inputs and dynamic dims; drop --input and --dynamic")
        module, args, dyn = import_onnx(src.spec)
        loaded = Loaded(module, args, {})
        loaded.dynamic_shapes = dyn
        return loaded
    if src.spec.startswith("hf:"):
        model, hf_config = _hf_model(src.spec[3:], src.config)
        default = _hf_default_inputs(hf_config, type(model).__name__)
        specs = [parse_input(t) for t in (src.inputs or default)]
        if not src.inputs:
            src.inputs = default
        vocab = getattr(hf_config, "vocab_size", None)
        args, kwargs = (), {}
    else:
        factory = _factory(src)
        model, args, kwargs = _call_factory(src.spec, factory, src.config)
        specs = [parse_input(t) for t in src.inputs]
        vocab = (src.config or {}).get("vocab_size")
    model.eval()
    loaded = Loaded(model, args, kwargs)
    dyn = [parse_dynamic(t) for t in src.dynamic]
    ranges = _symbol_ranges(specs, dyn, src.ranges)
    if specs:  # --input replaces the factory's example inputs; all are passed by keyword
        loaded.args = ()
        loaded.kwargs = _example_inputs(specs, ranges, src.seed, vocab if isinstance(vocab, int) else None, loaded)
    loaded.dynamic_shapes = _dynamic_shapes(model, loaded.args, loaded.kwargs, specs, dyn, ranges)
    return loaded


def user_ranged(src: Source) -> set[str]:
    """Symbols whose range the user gave with --dynamic (torch's suggestions never override those)."""
    return {d.symbol for d in map(parse_dynamic, src.dynamic) if d.min is not None or d.max is not None}


def _factory(src: Source) -> Callable:
    target, colon, attr = src.spec.rpartition(":")
    if not colon or not target:
        raise ItnetError(f"model spec {src.spec!r} has no ':factory'; write {SPEC_FORMS}")
    if not _IDENT.match(attr):
        raise ItnetError(f"model spec {src.spec!r}: {attr!r} is not a factory name; write {SPEC_FORMS}")
    if src.path is not None or target.endswith(".py") or "/" in target or os.sep in target:
        module = _import_file(Path(src.path or target), src)
    else:
        module = _import_module(target, src)
    fn = getattr(module, attr, None)
    if fn is None:
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
        raise ItnetError(f"{target} has no factory {attr!r}; callables there: {', '.join(names) or 'none'}")
    if not callable(fn):
        raise ItnetError(f"{target}:{attr} is a {type(fn).__name__}, not a factory function returning a model")
    return fn


def _import_file(path: Path, src: Source) -> object:
    if not path.exists():
        raise ItnetError(f"model file {path} does not exist (from spec {src.spec!r})")
    if path.suffix != ".py" or not path.is_file():
        raise ItnetError(f"model spec {src.spec!r}: {path} is not a Python module (.py file); write {SPEC_FORMS}")
    path = path.resolve()
    src.path = str(path)
    name = "_itnet_spec_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ItnetError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the file may import its siblings, as `python file.py` would allow
    sys.modules[name] = module
    _run_user_code(lambda: spec.loader.exec_module(module), f"importing {path}")
    return module


def _import_module(target: str, src: Source) -> object:
    if not _DOTTED.match(target):
        raise ItnetError(
            f"model spec {src.spec!r}: {target!r} is neither a .py file nor a module name; write {SPEC_FORMS}"
        )
    cwd = src.cwd or os.getcwd()
    src.cwd = cwd
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does, so that local packages are found
    try:
        return importlib.import_module(target)
    except SystemExit as e:
        raise ItnetError(f"importing {target} called exit({e.code!r}); a model module must define a factory") from None
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise ItnetError(f"no module named {target!r} (spec {src.spec!r}); check the name or PYTHONPATH") from None
        raise ItnetError(f"importing {target} failed: {e}; install the missing package") from None
    except SyntaxError as e:
        raise ItnetError(f"{e.filename}:{e.lineno}: syntax error ({e.msg}) while importing {target}") from None
    except Exception as e:
        raise ItnetError(f"importing {target} raised {type(e).__name__}: {first_line(e)}") from e


def _run_user_code(fn: Callable[[], object], what: str) -> object:
    try:
        return fn()
    except ItnetError:
        raise
    except SystemExit as e:  # the model's code must not end itnet (a --check would pass without comparing)
        raise ItnetError(f"{what} called exit({e.code!r}); a model factory must return a model") from None
    except SyntaxError as e:
        raise ItnetError(f"{e.filename}:{e.lineno}: syntax error ({e.msg}) while {what}") from None
    except Exception as e:
        raise ItnetError(f"{what} raised {type(e).__name__}: {first_line(e)}; ITNET_DEBUG=1 shows the traceback") from e


def _call_factory(spec: str, factory: Callable, cfg: dict | None) -> tuple[torch.nn.Module, tuple, dict]:
    """The factory returns a model or (model, inputs); inputs are a tuple of args, a dict of kwargs or one tensor."""
    result = _run_user_code(lambda: factory(**(cfg or {})), f"calling the factory {spec}")
    inputs: object = None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        result, inputs = result
    if not isinstance(result, torch.nn.Module):
        raise ItnetError(
            f"factory {spec} returned a {type(result).__name__}, not a torch.nn.Module or (model, example_inputs)"
        )
    if inputs is None:
        return result, (), {}
    if isinstance(inputs, dict):
        return result, (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return result, tuple(inputs), {}
    if isinstance(inputs, torch.Tensor):
        return result, (inputs,), {}
    raise ItnetError(f"factory {spec} returned inputs of type {type(inputs).__name__}; return a tuple or a dict")


def _hf_model(class_name: str, cfg: dict | None) -> tuple[torch.nn.Module, object]:
    if not _IDENT.match(class_name):
        raise ItnetError(f"hf:{class_name} is not a transformers class name; write e.g. hf:BertModel --config cfg.json")
    if cfg is None:
        raise ItnetError(f"hf:{class_name} needs --config config.json (a transformers config; nothing is downloaded)")
    itnet_config.set_hf_offline()
    try:
        import transformers
    except ImportError:
        raise ItnetError("hf: model specs need transformers; pip install 'itnet-compiler[hf]'") from None
    cls = _run_user_code(lambda: getattr(transformers, class_name, None), f"looking up transformers.{class_name}")
    if not isinstance(cls, type):
        raise ItnetError(f"transformers has no model class {class_name!r}; check the spelling (e.g. hf:BertModel)")
    quiet = itnet_config.debug_level() == 0
    verbosity = transformers.logging.get_verbosity()
    if quiet:  # config sanity notes are not errors; ITNET_DEBUG=1 shows them
        transformers.logging.set_verbosity_error()
    try:
        return _hf_build(transformers, cls, class_name, cfg)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _hf_build(transformers: object, cls: type, class_name: str, cfg: dict) -> tuple[torch.nn.Module, object]:
    data = dict(cfg)
    model_type = data.pop("model_type", None)
    config_cls = getattr(cls, "config_class", None)
    if config_cls is not None and model_type in (None, getattr(config_cls, "model_type", None)):
        make_config = lambda: config_cls(**data)
    elif model_type is not None:
        make_config = lambda: transformers.AutoConfig.for_model(model_type, **data)
    else:
        raise ItnetError(f'the config for hf:{class_name} needs a "model_type" entry (e.g. "bert")')
    hf_config = _run_user_code(make_config, f"building the {class_name} config")
    if "use_cache" not in cfg and hasattr(hf_config, "use_cache"):
        hf_config.use_cache = False  # a KV cache in the outputs cannot be exported; the config may ask for it
    build = cls.from_config if hasattr(cls, "from_config") and class_name.startswith("Auto") else cls
    model = _run_user_code(lambda: build(hf_config), f"building hf:{class_name} from its config")
    if not isinstance(model, torch.nn.Module):
        raise ItnetError(f"hf:{class_name} built a {type(model).__name__}, not a torch.nn.Module")
    want = cfg.get("attn_implementation")
    got = getattr(getattr(model, "config", None), "_attn_implementation", want)
    if want is not None and got != want:
        raise ItnetError(f"hf:{class_name} uses attn_implementation {got!r}, not the {want!r} the config asks for")
    return model, hf_config


def _hf_default_inputs(hf_config: object, class_name: str) -> list[str]:
    if hasattr(hf_config, "conv_dim") or "Wav2Vec2" in class_name:
        return ["input_values:2x16000:float32"]
    size = getattr(hf_config, "image_size", None)
    channels = getattr(hf_config, "num_channels", None)
    if size is not None and isinstance(channels, int):
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return [f"pixel_values:2x{channels}x{h}x{w}:float32"]
    return ["input_ids:2x16:int64"]


# ---------------------------------------------------------------------------------------------- example inputs


Range = tuple[int | None, int | None]


def _symbol_ranges(
    specs: list[InputSpec], dyn: list[DynamicSpec], adopted: dict[str, list[int | None]]
) -> dict[str, Range]:
    ranges: dict[str, Range] = {}
    for d in dyn:
        lo, hi = ranges.get(d.symbol, (None, None))
        ranges[d.symbol] = (d.min if d.min is not None else lo, d.max if d.max is not None else hi)
    for s in specs:
        for e in s.shape:
            if isinstance(e, SymDim):
                ranges.setdefault(e.name, (None, None))
    for name, (lo, hi) in adopted.items():
        if ranges.get(name, (None, None)) == (None, None):
            ranges[name] = (lo, hi)
    return ranges


def example_size(lo: int | None, hi: int | None) -> int:
    """The size an example input gets for a symbol without one: 16, moved into [min, max] (and at least 2)."""
    size = max(DEFAULT_SIZE, lo or 0)
    return min(size, hi) if hi is not None else size


def _example_inputs(
    specs: list[InputSpec], ranges: dict[str, Range], seed: int, vocab: int | None, loaded: Loaded
) -> dict[str, torch.Tensor]:
    sizes: dict[str, int] = {}
    for s in specs:
        for e in s.shape:
            if isinstance(e, SymDim) and e.example is not None:
                sizes.setdefault(e.name, e.example)
    for name, (lo, hi) in ranges.items():
        sizes.setdefault(name, example_size(lo, hi))
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for s in specs:
        if s.name in out:
            raise ItnetError(f"--input {s.name} is given twice")
        shape = [sizes[e.name] if isinstance(e, SymDim) else e for e in s.shape]
        low, high = input_range(s.name, vocab)
        if not s.dtype.is_floating_point and not s.dtype.is_complex:
            loaded.int_ranges[s.name] = [low, high]
        out[s.name] = random_tensor(shape, s.dtype, low, high, gen)
    return out


def input_range(name: str, vocab: int | None) -> tuple[int, int]:
    """[low, high) of a generated integer input: masks are all ones, token types zero, ids below the vocabulary."""
    if "mask" in name:
        return 1, 2
    if "token_type" in name:
        return 0, 1
    return 0, vocab or 100


def random_tensor(shape: list[int], dtype: torch.dtype, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(max(low, 0), max(min(high, 2), max(low, 0) + 1), shape, generator=gen).bool()
    return torch.randint(low, high, shape, generator=gen, dtype=dtype)


def _dynamic_shapes(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    specs: list[InputSpec],
    dyn: list[DynamicSpec],
    ranges: dict[str, Range],
) -> dict | None:
    """``torch.export`` dynamic shapes keyed by forward-argument name; one ``Dim`` per symbol name."""
    axes: dict[str, dict[int, str]] = {}
    for s in specs:
        for axis, e in enumerate(s.shape):
            if isinstance(e, SymDim):
                axes.setdefault(s.name, {})[axis] = e.name
    for d in dyn:
        axes.setdefault(d.name, {})[d.axis] = d.symbol
    if not axes:
        return None
    dims = {}
    for name, (lo, hi) in ranges.items():
        bounds = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        dims[name] = torch.export.Dim(name, **bounds)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise ItnetError(f"the example inputs do not fit {type(model).__name__}.forward: {e}") from None
    params = inspect.signature(model.forward).parameters
    shapes: dict[str, object] = {}
    for pname, val in bound.arguments.items():
        kind = params[pname].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            shapes[pname] = {k: _axes_for(k, v, axes, dims) for k, v in val.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            shapes[pname] = tuple(None for _ in val)
        else:
            shapes[pname] = _axes_for(pname, val, axes, dims)
    unknown = set(axes) - set(bound.arguments) - {k for v in bound.arguments.values() if isinstance(v, dict) for k in v}
    if unknown:
        raise ItnetError(
            f"--dynamic names input(s) {sorted(unknown)}, but the model's inputs are {list(bound.arguments)}"
        )
    return shapes


def _axes_for(name: str, val: object, axes: dict[str, dict[int, str]], dims: dict) -> dict | None:
    if name not in axes:
        return None
    if not isinstance(val, torch.Tensor):
        raise ItnetError(f"--dynamic names input {name!r}, which is a {type(val).__name__}, not a tensor")
    for axis in axes[name]:
        if axis >= val.dim():
            raise ItnetError(f"--dynamic {name}:{axis}: input {name!r} has only {val.dim()} dimensions")
    return {axis: dims[sym] for axis, sym in axes[name].items()}


def suggested_ranges(err: BaseException) -> dict[str, Range]:
    """The ``Dim`` ranges torch.export suggests after a constraint violation (``seq = Dim('seq', max=128)``)."""
    text = str(err.__cause__ or err)
    if "Suggested fixes" not in text:
        return {}
    out: dict[str, Range] = {}
    for m in _SUGGESTED_DIM.finditer(text):
        bounds = dict(re.findall(r"(min|max)=(\d+)", m.group(3)))
        out[m.group(2)] = (
            int(bounds["min"]) if "min" in bounds else None,
            int(bounds["max"]) if "max" in bounds else None,
        )
    return out


def suggested_fixes(err: BaseException) -> str:
    """torch.export's suggested fixes on one line, or ''."""
    text = str(err.__cause__ or err)
    _, found, rest = text.partition("Suggested fixes:")
    if not found:
        return ""
    lines = [ln.strip() for ln in rest.strip().split("\n\n")[0].splitlines() if ln.strip()]
    return "; ".join(lines)
