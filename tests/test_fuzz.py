"""Fuzz target (issue #9): mutated printed programs of real models through parse → verify → build → forward.

Every text must either run or fail with one ``ItnetError`` whose message is a single line, within
``fuzzing.TIME_LIMIT`` seconds, and no text may execute code, import a module or write a file (the canary). The
hypothesis test draws a few hundred mutations, derandomized so CI sees the same texts on every run; the regression
cases below pin one text for each hostile pattern. Each text runs in a forked worker that is killed at the time limit
(``tests/fuzzing.py``), so a hang fails one example instead of the whole run. Long runs: ``python bench/fuzz.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta

import fuzzing
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

SEEDS = fuzzing.load_seeds()
BASE = "conv_attention"  # the seed the regression cases edit: small, dynamic, a convolution and an attention


@pytest.fixture(scope="module")
def worker() -> fuzzing.Worker:
    fuzzing.warm(SEEDS)  # before the first fork: workers start with every import and cache already made
    w = fuzzing.Worker()
    yield w
    w.close()


def describe(out: fuzzing.Outcome, text: str, seed: str | None = None) -> str:
    lines = text.split("\n")
    seed = seed or max(SEEDS, key=lambda name: len(set(lines) & set(SEEDS[name].split("\n"))))
    known = set(SEEDS[seed].split("\n"))
    changed = [ln[:200] for ln in lines if ln not in known][:4]
    return (
        f"{out.status} at {out.stage}: {out.exc_type} {out.message[:400]!r} canary={out.canary!r} "
        f"({out.seconds:.1f} s); lines not in seed {seed}: {changed}"
    )


# ----------------------------------------------------------------------------------------------------- harness
def test_seeds_run_cleanly(worker: fuzzing.Worker) -> None:
    """Every seed converts, builds and runs: the fuzz starts from valid programs, and findings are the mutations'."""
    assert {p.stem for p in fuzzing.SEED_DIR.glob("*.itir")} == set(fuzzing._seed_models())
    for name, text in SEEDS.items():
        out = worker.run(text)
        assert out.status == "ok" and out.stage == "forward" and not out.canary, (name, out)


def test_canary_fires(worker: fuzzing.Worker) -> None:
    """The detector sees what an executed payload would do: the canary file, its compiled code, the module import."""
    out = worker.run(fuzzing.SELFTEST)
    assert f"{fuzzing.CANARY_FILE} created" in out.canary
    assert f"import {fuzzing.CANARY_MODULE}" in out.canary and "exec of code naming the canary" in out.canary
    assert worker.run(SEEDS[BASE]).clean  # and it is reset for the next text


def test_hang_is_counted_and_the_worker_restarts() -> None:
    w = fuzzing.Worker(limit=0.5)
    try:
        out = w.run(fuzzing.SLEEP)
        assert out.status == "hang" and not out.clean
        assert w.run(SEEDS["gru"]).status == "ok"
    finally:
        w.close()


# ------------------------------------------------------------------------------------------------- hypothesis
@pytest.mark.parametrize("kind", sorted(fuzzing.MUTATIONS))
@settings(
    max_examples=25,
    deadline=timedelta(seconds=3 * fuzzing.TIME_LIMIT),  # the worker enforces TIME_LIMIT; this is a backstop
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example runs in a worker, findings are reported
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mutated_programs_fail_cleanly(worker: fuzzing.Worker, kind: str, data: st.DataObject) -> None:
    seed, kinds, text = fuzzing.mutate(fuzzing.DataChooser(data), SEEDS, [kind], most=2)
    out = worker.run(text)
    note(f"seed {seed}, mutations {kinds}")
    assert out.clean, describe(out, text, seed)


# -------------------------------------------------------------------------------------------------- regressions
def edit(old: str, new: str, seed: str = BASE) -> str:
    """The seed with the first occurrence of ``old`` replaced (``old`` must be there: seeds are regenerated)."""
    text = SEEDS[seed]
    assert old in text, f"{old!r} is not in seed {seed}; update the regression case"
    return text.replace(old, new, 1)


def before_output(lines: str, output: str | None = None, seed: str = BASE) -> str:
    """Insert lines before the output line; with ``output``, that becomes the output line."""
    head, out_line = SEEDS[seed].rstrip("\n").rsplit("\n", 1)
    return f"{head}\n{lines}\n{output or out_line}\n"


RELU = "%relu = aten.relu.default(%conv1d) : f32[2,16,T]"
INPUT = "input %x : f32[2,T,8]"
TRANSPOSE = "%transpose = aten.transpose.int(%x, 1, 2) : f32[2,8,T]"
LINEAR = (
    '%linear = aten.linear.default(%transpose_2, %p_attn_in_proj_weight, %p_attn_in_proj_bias) : f32[T,2,48] @"attn"'
)
HEADS = 'family="dot_exp", heads=2,'
STRIDE = "stride=[1], support="
SIG_OUT = 'signature out "*"'
CONV_KEY = '"conv.weight"'

CASES: dict[str, Callable[[], str]] = {
    # numbers: huge, negative, zero, float, as sizes and as arguments
    **{
        f"dim-{n}": (lambda n=n: edit(INPUT, f"input %x : f32[2,{n},8]"))
        for n in ("9**9**9", "2**100000", "(2**31)**(2**31)", "1e20", "-1", "0", "9" * 5000)
    },
    **{
        f"int-arg-{n[:12]}": (lambda n=n: edit(TRANSPOSE, TRANSPOSE.replace("%x, 1, 2", f"%x, {n}, 2")))
        for n in ("1e20", "-1", "9" * 5000, "9223372036854775808", "1.5", "nan")
    },
    "symbol-range-huge": lambda: edit("symbol T in [2, 64]", "symbol T in [2, 99999999999999999999]"),
    "symbol-range-inverted": lambda: edit("symbol T in [2, 64]", "symbol T in [5, 2]"),
    "symbol-range-negative": lambda: edit("symbol T in [2, 64]", "symbol T in [-5, -1]"),
    # size expressions
    **{
        f"size-{e}": (lambda e=e: edit(RELU, RELU.replace("f32[2,16,T]", f"f32[2,16,{e}]")))
        for e in ("Mod(T,0)", "ceiling(T/0)", "T**T**T", "0/0", "(-1)**(1/2)", "Max(T,2**64)", "floor(1/0)")
    },
    # names: python keywords, '..', '1x', empty; kwargs, symbols and weight keys too
    **{f"value-{n}": (lambda n=n: SEEDS[BASE].replace("%relu", f"%{n}")) for n in ("class", "..", "1x", "None", "_")},
    "kwarg-lambda": lambda: edit("q=%view_3", "lambda=%view_3"),
    "kwarg-class-generic": lambda: edit(TRANSPOSE, TRANSPOSE.replace("%x, 1, 2", "%x, 1, class=2")),
    "symbol-lambda": lambda: re.sub(r"\bT\b", "lambda", SEEDS[BASE]),
    **{
        f"weight-key-{k or 'empty'}": (lambda k=k: edit(CONV_KEY, json.dumps(k)))
        for k in ("", ".", "..", "_modules", "forward", "__class__", "training", "a/b", "cuda")
    },
    # a weight named like the module's device anchor, in a program that needs one (device arguments)
    "weight-key-device-anchor": lambda: edit('"encoder.layer.0.intermediate.dense.weight"', '"_itnet_device"', "bert"),
    # op names: other ops, unknown ops and hostile callables in place of a relu
    **{f"op-{op}": (lambda op=op: edit(RELU, RELU.replace("aten.relu.default", op))) for op in fuzzing.HOSTILE_OPS},
    **{
        f"op-{op}": (lambda op=op: edit(RELU, RELU.replace("aten.relu.default", op)))
        for op in ("aten.nonexistent.default", "aten.add", "it.transform", "torch.nope", "prims.view_of.default")
    },
    # hostile lines that would run code, import, open or write files, or compute for hours
    **{
        f"payload-{i}": (lambda p=p: before_output(p.replace("{V}", "%x"), "output %pwn" if "%pwn" in p else None))
        for i, p in enumerate(fuzzing.PAYLOADS)
    },
    # it.transform attributes of the wrong type
    **{
        f"attr-heads-{v}": (lambda v=v: edit(HEADS, f'family="dot_exp", heads={v},'))
        for v in ("0", "[]", '"x"', "1e20", "%x", "none", "-1", "2147483648")
    },
    **{f"attr-stride-{v}": (lambda v=v: edit(STRIDE, f"stride={v}, support=")) for v in ("[0]", "[-1]", "0", "[[]]")},
    "attr-family-list": lambda: edit('family="dot_exp"', "family=[0, 0]"),
    "attr-family-stationary": lambda: edit('family="dot_exp"', 'family="stationary"'),
    "attr-lowering-options": lambda: edit(
        'lowering="auto", mask="none"', 'lowering="montecarlo:samples=0", mask="none"'
    ),
    "attr-support-window0": lambda: edit('support="full"', 'support="window(0)"'),
    "attr-duplicate": lambda: edit(HEADS, HEADS + " heads=3,"),
    # deep nesting
    "nest-list-1e4": lambda: edit(TRANSPOSE, TRANSPOSE.replace("%x, 1, 2", "[" * 10**4 + "]" * 10**4 + ", 1, 2")),
    "nest-list-open-1e5": lambda: edit(TRANSPOSE, TRANSPOSE.replace("%x, 1, 2", "[" * 10**5)),
    "nest-paren-1e4": lambda: edit(INPUT, "input %x : f32[2," + "(" * 10**4 + "T" + ")" * 10**4 + ",8]"),
    "nest-minus-1e4": lambda: edit(INPUT, "input %x : f32[2," + "-" * 10**4 + "T,8]"),
    "nest-signature-json-1e5": lambda: edit(SIG_OUT, "signature out " + "[" * 10**5 + "]" * 10**5),
    "nest-signature-object-1e5": lambda: edit(SIG_OUT, "signature out " + '{"a":' * 10**5 + "1" + "}" * 10**5),
    "nest-output-1e4": lambda: before_output("", "output " + "[" * 10**4 + "%layer_norm" + "]" * 10**4),
    # long lines
    "long-name-1e6": lambda: SEEDS[BASE].replace("%relu", "%" + "r" * 10**6),
    "long-string-1e6": lambda: edit('@"attn"', '@"' + "x" * 10**6 + '"'),
    "long-number-1e5": lambda: edit(TRANSPOSE, TRANSPOSE.replace("%x, 1, 2", "%x, " + "7" * 10**5 + ", 2")),
    "long-list-1e5": lambda: edit(
        TRANSPOSE, TRANSPOSE.replace("%x, 1, 2", "%x, [" + ", ".join(["1"] * 10**5) + "], 2")
    ),
    "long-rank-1e4": lambda: edit(RELU, RELU.replace("f32[2,16,T]", "f32[" + ",".join(["1"] * 10**4) + "]")),
    "long-garbage-1e6": lambda: edit(RELU, RELU + " " + "x" * 10**6),
    # the @"layer" string: escaped and raw newlines and control characters, a lone surrogate; on a node whose
    # error names its layer (the declared type is wrong)
    **{
        f"layer-{i}": (lambda s=s: edit(LINEAR, LINEAR.replace("f32[T,2,48] @", "f32[7] @").replace('"attn"', s)))
        for i, s in enumerate(
            (
                r'"a\nb"',
                r'"a\r\nb"',
                r'"\u2028"',
                r'"\u0085"',
                r'"\u0000"',
                r'"\u001b[2J"',
                r'"\ud800"',
                '"a\nb"',
                '"a\x0bb"',
                r'"\n"',
            )
        )
    },
    # signatures that name modules and callables instead of containers
    "sig-canary-module": lambda: edit(SIG_OUT, f'signature out {{"type":"{fuzzing.CANARY_MODULE}.T","children":[]}}'),
    "sig-os-system": lambda: edit(SIG_OUT, 'signature out {"type":"os.system","context":null,"children":["*"]}'),
    "sig-builtins-eval": lambda: edit(SIG_OUT, 'signature out {"type":"builtins.eval","context":null,"children":[]}'),
    "sig-type-int": lambda: edit(SIG_OUT, 'signature out {"type":5}'),
    "sig-children-string": lambda: edit(SIG_OUT, 'signature out {"type":"builtins.tuple","children":"**"}'),
    "sig-dict-context-int": lambda: edit(
        SIG_OUT, 'signature out {"type":"builtins.dict","context":5,"children":["*"]}'
    ),
    "sig-out-too-many-leaves": lambda: edit(SIG_OUT, 'signature out {"type":"builtins.tuple","children":["*","*"]}'),
    # line-level deletes, duplicates, swaps
    "line-delete-input": lambda: edit(INPUT + "\n", ""),
    "line-delete-output": lambda: SEEDS[BASE].rstrip("\n").rsplit("\n", 1)[0] + "\n",
    "line-duplicate-node": lambda: edit(RELU, RELU + "\n" + RELU),
    "line-duplicate-symbol": lambda: edit("symbol T in [2, 64]", "symbol T in [2, 64]\nsymbol T in [3, 8]"),
    "line-swap-nodes": lambda: edit(TRANSPOSE + "\n", "").replace(RELU, RELU + "\n" + TRANSPOSE),
    "line-delete-weight": lambda: edit('param %p_conv_bias : f32[16] = "conv.bias"\n', ""),
    "line-duplicate-weight": lambda: edit(
        'param %p_conv_bias : f32[16] = "conv.bias"',
        'param %p_conv_bias : f32[16] = "conv.bias"\nparam %p_conv_bias2 : f32[16] = "conv.bias"',
    ),
    # declared types that disagree with what the op produces
    "type-relu-f32[7]": lambda: edit(RELU, RELU.replace("f32[2,16,T]", "f32[7]")),
    "type-relu-i64": lambda: edit(RELU, RELU.replace("f32[2,16,T]", "i64[2,16,T]")),
    "type-relu-rank": lambda: edit(RELU, RELU.replace("f32[2,16,T]", "f32[2,16,T,1]")),
    "type-relu-int": lambda: edit(RELU, RELU.replace("f32[2,16,T]", "int")),
    "type-relu-none": lambda: edit(RELU, RELU.replace("f32[2,16,T]", "none")),
    "type-input-channels": lambda: edit(INPUT, "input %x : f32[2,T,9]"),
    "type-input-dtype": lambda: edit(INPUT, "input %x : i64[2,T,8]"),
    "type-weight-shape": lambda: edit("f32[16,8,3]", "f32[16,8,5]"),
    "type-weight-symbolic": lambda: edit("f32[16,8,3]", "f32[16,8,T]"),
    "type-transform-output": lambda: edit("} : f32[2,2,T,8]", "} : f32[2,2,T,9]"),
    "type-mod-zero-scalar": lambda: edit(": int(T)", ": int(Mod(T,0))"),
    # the recurrent family runs torch's RNN kernels: weights and inputs of other dtypes, an empty length
    **{
        f"type-gru-bias-{d}": (lambda d=d: edit("%p_rnn_bias_hh_l0 : f32[48]", f"%p_rnn_bias_hh_l0 : {d}[48]", "gru"))
        for d in ("i32", "i64", "b8", "f16", "c128")
    },
    **{
        f"type-lstm-weight-{d}": (
            lambda d=d: edit(
                "%p_rnn_weight_hh_l0_reverse : f32[64,16]", f"%p_rnn_weight_hh_l0_reverse : {d}[64,16]", "lstm"
            )
        )
        for d in ("b8", "u8", "i8", "f16", "f64")
    },
    **{
        f"type-gru-input-{d}": (lambda d=d: edit(INPUT, f"input %x : {d}[2,T,8]", "gru"))
        for d in ("i32", "c128", "f16")
    },
    "symbol-gru-zero-range": lambda: edit("symbol T in [2, 64]", "symbol T in [0, 0]", "gru"),
    "symbol-conv-zero-range": lambda: edit("symbol T in [2, 64]", "symbol T in [0, 0]"),
    # the built module called wrongly, the program through a damaged bundle, built with a forced plan (directives)
    **{f"call-{c}": (lambda c=c: SEEDS[BASE] + f"# fuzz: call={c}\n") for c in fuzzing.CALLS},
    **{f"call-bert-{c}": (lambda c=c: SEEDS["bert"] + f"# fuzz: call={c}\n") for c in fuzzing.CALLS},
    **{f"call-lstm-{c}": (lambda c=c: SEEDS["lstm"] + f"# fuzz: call={c}\n") for c in fuzzing.CALLS},
    **{f"bundle-{b}": (lambda b=b: SEEDS[BASE] + f"# fuzz: bundle={b}\n") for b in fuzzing.BUNDLES},
    **{f"plan-{p}": (lambda p=p: SEEDS[BASE] + f"# fuzz: plan={p}\n") for p in fuzzing.PLANS},
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_pattern_fails_cleanly(worker: fuzzing.Worker, name: str) -> None:
    text = CASES[name]()
    out = worker.run(text)
    assert out.clean, describe(out, text)
