"""One built module called from several threads at once, as a server calls one model from its worker threads.

Every call must succeed and return what the same call returns alone: the run-time state is activated per call (no
token of one thread ever reset in another), Monte Carlo estimates and cached factors are written safely while others
read them, a cache miss that several threads hit at once is computed once, and on the Triton backend concurrent
first calls load each generated kernel once while the interpreter runs one launch at a time.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("ITNET_TEST_GPU") else "1")

import copy  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402
import transformers  # noqa: E402
from models import cnn  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.backends.torch.runtime import ErrorEstimate, RuntimeState, active, cached, report_error  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THREADS = 4
Inputs = tuple[tuple[object, ...], dict[str, object]]


def _tensors(out: object) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _serve(mod, inputs: list[Inputs], expected: list[list[torch.Tensor]], calls: int, watch=None) -> list[str]:
    """THREADS threads call ``mod`` ``calls`` times each, thread i on ``inputs[i]``, all released at once (with
    ``watch``, one more thread calls it in a loop meanwhile). Returns the problems seen: exceptions, and outputs
    not bit for bit ``expected[i]``."""
    problems: list[str] = []
    start = threading.Barrier(THREADS + (watch is not None))
    done = threading.Event()

    def work(i: int) -> None:
        args, kwargs = inputs[i]
        start.wait()
        for n in range(calls):
            try:
                with torch.no_grad():
                    got = _tensors(mod(*args, **kwargs))
            except Exception as e:  # every failure is a finding: record it, keep serving
                problems.append(f"thread {i}: {type(e).__name__}: {str(e)[:200]}")
                continue
            same = len(got) == len(expected[i]) and all(map(torch.equal, got, expected[i]))
            if not same:
                problems.append(f"thread {i}, call {n}: output differs from the serial call")

    def watcher() -> None:
        start.wait()
        while not done.is_set():
            try:
                watch()
            except Exception as e:
                problems.append(f"watcher: {type(e).__name__}: {str(e)[:200]}")
                return
            time.sleep(1e-4)  # yield the interpreter lock: read often, without starving the callers

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    side = [threading.Thread(target=watcher)] if watch is not None else []
    for t in threads + side:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in side:
        t.join()
    return problems


def _check_against_serial(build: Callable[[], torch.nn.Module], inputs: list[Inputs], calls: int, watch=None):
    """Serial reference from one module, the concurrent run on a fresh one of the same program (so its caches start
    empty and its first calls race); every concurrent output must equal the serial one bit for bit."""
    serial_mod = build()
    with torch.no_grad():
        expected = [_tensors(serial_mod(*a, **kw)) for a, kw in inputs]
    mod = build()
    problems = _serve(mod, inputs, expected, calls, watch=(lambda: watch(mod)) if watch else None)
    assert not problems, f"{len(problems)} problems in {THREADS * calls} calls, first: {problems[:3]}"
    return serial_mod, mod


def _bert_small() -> tuple[torch.nn.Module, list[Inputs]]:
    cfg = json.loads((ROOT / "examples" / "bert_small.json").read_text())
    cfg.pop("model_type")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**cfg)).eval()
    inputs = []
    for i in range(THREADS):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, cfg["vocab_size"], (2, 16), generator=g)
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 16 - 2 * (i + 1) :] = 0
        inputs.append(((ids,), {"attention_mask": mask}))
    return model, inputs


@pytest.fixture(scope="module")
def bert_prog():
    model, inputs = _bert_small()
    return itc.convert(model, inputs[0][0], inputs[0][1]), inputs


@pytest.fixture(scope="module")
def cnn_prog():
    case = cnn()
    g = torch.Generator().manual_seed(1)
    inputs = [(tuple(torch.randn(a.shape, generator=g) for a in case.args), {}) for _ in range(THREADS)]
    return itc.convert(case.model, case.args), inputs


@pytest.mark.parametrize("plan, calls", [(None, 100), ({"*": "fft"}, 20)], ids=["library", "fft-cached-spectra"])
def test_example_cnn_serves_four_threads(cnn_prog, plan, calls):
    """The CNN of every convolution variant; ``fft`` keeps each weight's spectrum in the module's cache."""
    prog, inputs = cnn_prog
    _, mod = _check_against_serial(lambda: itc.build(prog, plan=plan), inputs, calls)
    if plan:
        assert len(mod.runtime.cache) == sum(t.family == "stationary" for t in prog.transforms)


def test_small_bert_serves_four_threads(bert_prog):
    prog, inputs = bert_prog
    _check_against_serial(lambda: itc.build(prog), inputs, 100)


def test_montecarlo_estimates_are_written_by_four_threads_while_read(bert_prog):
    """Each forward writes one estimate per layer while another thread reads the table: no read fails, and each
    layer ends with the complete estimate of one of the calls, as serial calls on the same inputs report it."""
    prog, inputs = bert_prog
    plan = {"*": "montecarlo:samples=64,seed=0"}
    serial_mod = itc.build(prog, plan=plan)
    per_input = []
    with torch.no_grad():
        for args, kwargs in inputs:
            serial_mod(*args, **kwargs)
            per_input.append(serial_mod.error_estimates)
    layers = {t.name for t in prog.transforms if t.family == "dot_exp"}
    assert layers and all(set(e) == layers for e in per_input)

    _, mod = _check_against_serial(lambda: itc.build(prog, plan=plan), inputs, 25, watch=lambda m: m.error_estimates)
    table = mod.error_estimates
    assert set(table) == layers
    for layer, est in table.items():
        assert any(est == e[layer] for e in per_input), layer


def test_concurrent_misses_of_one_key_compute_it_once():
    """The first callers of a cached factorisation wait for one of them instead of each fitting it again."""
    state = RuntimeState()
    made: list[int] = []
    got: list[object] = []
    start = threading.Barrier(THREADS)

    def make() -> object:
        made.append(1)
        time.sleep(0.05)  # long enough that every thread misses while the first computes
        return object()

    def work() -> None:
        with state:
            start.wait()
            got.append(cached(("layer", "svd"), (), make))

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(got) == THREADS and all(g is got[0] for g in got)


def test_each_thread_sees_only_the_states_it_activated():
    a, b = RuntimeState(), RuntimeState()
    inside = threading.Barrier(2)
    seen: dict[str, list[object]] = {}

    def work(name: str, state: RuntimeState) -> None:
        with state:
            inside.wait()  # both states are active at once, one per thread
            report_error(name, ErrorEstimate(1.0, 0.1, 8))
            seen[name] = [active()]
            inside.wait()
        seen[name].append(active())

    threads = [threading.Thread(target=work, args=("a", a)), threading.Thread(target=work, args=("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": [a, None], "b": [b, None]}
    assert set(a.errors) == {"a"} and set(b.errors) == {"b"}
    with a:
        with b:
            assert active() is b
        assert active() is a
    assert active() is None


def test_a_copied_module_runs_and_reports_into_its_own_state(bert_prog):
    prog, inputs = bert_prog
    mod = itc.build(prog, plan={"*": "montecarlo:samples=16,seed=0"})
    args, kwargs = inputs[0]
    with torch.no_grad():
        out = mod(*args, **kwargs)
        twin = copy.deepcopy(mod)
        twin.runtime.errors.clear()
        again = twin(*args, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(_tensors(out), _tensors(again), strict=True))
    assert twin.runtime is not mod.runtime and twin.error_estimates == mod.error_estimates


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(2, 24, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.skipif(
    not os.environ.get("ITNET_TEST_GPU") and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="no CUDA device and TRITON_INTERPRET is not set",
)
def test_triton_module_serves_four_threads_from_its_first_call(tmp_path, monkeypatch):
    """The concurrent run starts with no kernel loaded and an empty cache directory, so its first calls race to write
    and import the generated source; no layer may fall back to torch on the way."""
    from itnet_compiler.backends.triton import loader

    device = "cuda" if os.environ.get("ITNET_TEST_GPU") else "cpu"
    torch.manual_seed(0)
    model = _Attention().eval().to(device)
    g = torch.Generator().manual_seed(2)
    inputs = [((torch.randn(2, 24, 16, generator=g).to(device),), {}) for _ in range(THREADS)]
    prog = itc.convert(model, inputs[0][0])
    serial = itc.build(prog, backend="triton", plan={"*": "fused"}).to(device)
    with torch.no_grad():
        expected = [_tensors(serial(*a)) for a, _ in inputs]
    assert not serial.fallbacks

    monkeypatch.setenv("ITNET_CACHE_DIR", str(tmp_path))
    loader._LOADED.clear()
    mod = itc.build(prog, backend="triton", plan={"*": "fused"}).to(device)
    problems = _serve(mod, inputs, expected, 3)
    assert not problems and not mod.fallbacks, (problems[:3], mod.fallbacks)
    assert not list((tmp_path / "triton").glob("*.tmp"))
