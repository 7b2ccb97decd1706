"""Distributed data-parallel training, for real: two gloo processes on the CPU, launched as torchrun would.

Each rank is a separate Python process (this file run as a script) given MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
and LOCAL_RANK. The ranks build the same models, shard every step's global batch between them and train with SGD.
The test process then trains the same models alone on the whole batches and checks that every parameter, by name,
ends the same (float64, so the only difference is the order of the reductions):

- ``bert``: a small BertModel converted by ``itc.convert``, saved, loaded and built by ``itc.build(backend="torch")``
  in each rank, with a linear head on its pooler output;
- ``itnet``: two native ``itnet_compiler.nn.IntegralTransform`` layers (dim 16) and a classification head, in eager
  PyTorch;
- ``itnet_built``: the same network converted (each layer one ``mlp`` transform) and built.

Each is wrapped once by ``DistributedDataParallel`` and once by FSDP (``torch.distributed.fsdp.fully_shard``;
per layer where the layers are submodules the forward calls, the whole model for a built one, whose generated graph
reads its parameters itself). A control run without either wrapper (each rank alone on its shard) must not match.
A rank that raises fails the run with its traceback. The ranks get this process's
environment without ``TRITON_INTERPRET``: they run the torch backend whatever the suite set.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import itnet_compiler as itc
from itnet_compiler.nn import IntegralTransform

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
STEPS = 3
BATCH = 8  # global; each of the two ranks gets 4
SEQ = 8
CLASSES = 3
LR = 0.5
DTYPE = torch.float64
MODELS = ("bert", "itnet", "itnet_built")
WRAPS = ("ddp", "fsdp")
LAUNCH_TIMEOUT = 240.0  # seconds for one launch, however many scenarios it runs
GRACE = 10.0  # seconds the other ranks get to report their own errors after one fails


class ItnetNet(nn.Module):
    """Features [B, N, 4] -> Linear -> IntegralTransform -> tanh -> IntegralTransform -> mean over N -> logits."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.l1 = IntegralTransform(dim, heads=4, hidden=16, seed=1)
        self.l2 = IntegralTransform(dim, heads=4, hidden=16, seed=2)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.l2(torch.tanh(self.l1(self.embed(x)))).mean(1))


class Classifier(nn.Module):
    """A built BertModel with a linear head on its pooler output."""

    def __init__(self, body: nn.Module, dim: int) -> None:
        super().__init__()
        self.body = body
        torch.manual_seed(1)
        self.head = nn.Linear(dim, CLASSES).to(DTYPE)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(ids).pooler_output)


def make_bundles(out: Path) -> dict[str, str]:
    """Convert the two source models once; every process loads and builds the same bundles."""
    from transformers import BertConfig, BertModel

    batch = torch.export.Dim("batch", min=1, max=64)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
    bert = BertModel(cfg).to(DTYPE).eval()
    ids = torch.randint(0, 64, (BATCH, SEQ))
    itc.convert(bert, (ids,), dynamic_shapes={"input_ids": {0: batch}}).save(out / "bert.itir")
    torch.manual_seed(0)
    net = ItnetNet().to(DTYPE)
    x = torch.randn(BATCH, SEQ, 4, dtype=DTYPE)
    itc.convert(net, (x,), dynamic_shapes={"x": {0: batch}}).save(out / "itnet.itir")
    return {"bert": str(out / "bert.itir"), "itnet": str(out / "itnet.itir")}


def make_model(name: str, bundles: dict[str, str]) -> nn.Module:
    if name == "bert":
        return Classifier(itc.build(itc.load(bundles["bert"]), backend="torch"), 32)
    if name == "itnet":
        torch.manual_seed(0)
        return ItnetNet().to(DTYPE)
    if name == "itnet_built":
        return itc.build(itc.load(bundles["itnet"]), backend="torch")
    raise ValueError(name)


def make_batches(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        if name == "bert":
            x = torch.randint(0, 64, (BATCH, SEQ), generator=gen)
        else:
            x = torch.randn(BATCH, SEQ, 4, generator=gen, dtype=DTYPE)
        out.append((x, torch.randint(0, CLASSES, (BATCH,), generator=gen)))
    return out


def train(model: nn.Module, batches, rank: int = 0, world: int = 1) -> list[float]:
    """SGD without momentum on this rank's contiguous shard of each global batch; returns the local losses."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per = BATCH // world
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(v) for v in losses]


def full_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameters (gathered whole from their shards under FSDP) and buffers, by their names in the model."""
    from torch.distributed.tensor import DTensor

    params = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p  # a collective: every rank, same order
        params[n] = t.detach().clone()
    return params, {n: b.detach().clone() for n, b in model.named_buffers()}


# ---------------------------------------------------------------- the rank side (this file run as a script)


def wrap(model: nn.Module, name: str, how: str) -> nn.Module:
    if how == "alone":  # the control: each rank trains on its shard, no gradient is exchanged
        return model
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    from torch.distributed.fsdp import fully_shard

    if name == "itnet":
        fully_shard(model.l1)
        fully_shard(model.l2)
    elif name == "bert":
        fully_shard(model.body)
    fully_shard(model)
    return model


def rank_main(job_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert "TRITON_INTERPRET" not in os.environ
    job = torch.load(job_path, weights_only=False)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        if job.get("fail_rank") == rank:
            raise RuntimeError(f"rank {rank} fails on purpose")
        results = {}
        for name, how in job["scenarios"]:
            model = wrap(make_model(name, job["bundles"]), name, how)
            losses = torch.tensor(train(model, make_batches(name), rank, world), dtype=DTYPE)
            dist.all_reduce(losses)  # the mean of the shards' mean losses is the global batch's mean loss
            inner = getattr(model, "module", model)
            params, buffers = full_state(inner)
            results[f"{name}/{how}"] = {"params": params, "buffers": buffers, "losses": (losses / world).tolist()}
            # torch 2.13 + gloo: a process that exits with a DDP or FSDP module alive aborts in about half the runs
            # ("terminate called without an active exception", SIGABRT), so none outlives its scenario.
            del model, inner
            gc.collect()
        dist.barrier()
        torch.save(results, out_path)
    except BaseException:
        # Report now and leave: destroy_process_group would wait on peers that may wait on this rank.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


# ---------------------------------------------------------------- the launcher


class RankFailed(AssertionError):
    def __init__(self, message: str, codes: list[int | None]) -> None:
        super().__init__(message)
        self.codes = codes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: dict, tmp: Path, world: int = WORLD, timeout: float = LAUNCH_TIMEOUT) -> list[dict]:
    """Run ``world`` ranks of ``rank_main`` as processes; a rank that exits non-zero (or a hang) ends the run: the
    others get ``GRACE`` seconds to exit, are killed, and ``RankFailed`` gives each rank's exit code and the end of its
    output."""
    torch.save(job, tmp / "job.pt")
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("TORCHELASTIC")}
    base |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
             "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
             "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    procs, logs = [], []
    for r in range(world):
        log = open(tmp / f"rank{r}.log", "w+")  # closed below
        env = base | {"RANK": str(r), "LOCAL_RANK": str(r)}
        argv = [sys.executable, __file__, str(tmp / "job.pt"), str(tmp / f"rank{r}.pt")]
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + timeout
    failed = hung = False
    try:
        while any(p.poll() is None for p in procs):
            if not failed and any(p.returncode for p in procs):
                failed, deadline = True, min(deadline, time.monotonic() + GRACE)
            if time.monotonic() > deadline:
                hung = not failed
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    if any(codes):
        why = f"timed out after {timeout:.0f} s" if hung else "failed"
        detail = "\n".join(
            f"--- rank {r} (exit {c}):\n{t[-3000:]}" for r, (c, t) in enumerate(zip(codes, texts, strict=True))
        )
        raise RankFailed(f"distributed run {why}: exit codes {codes} (negative: killed)\n{detail}", codes)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def reference(bundles: dict[str, str]) -> dict[str, dict]:
    """One process, the whole batch each step, no process group."""
    out = {}
    for name in MODELS:
        model = make_model(name, bundles)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = train(model, make_batches(name))
        params, buffers = full_state(model)
        out[name] = {"params": params, "buffers": buffers, "losses": losses, "init": init}
    return out


@pytest.fixture(scope="module")
def ranks(bundles: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """All six scenarios in one two-rank launch (process start-up is most of the time)."""
    job = {"bundles": bundles, "scenarios": [(m, w) for w in WRAPS for m in MODELS] + [("itnet", "alone")]}
    return launch(job, tmp_path_factory.mktemp("ranks"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    diffs = {n: (a[n] - b[n]).abs().max().item() if a[n].numel() else 0.0 for n in a}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


@pytest.mark.parametrize("how", WRAPS)
@pytest.mark.parametrize("name", MODELS)
def test_two_ranks_match_one_process(name: str, how: str, ranks: list[dict], reference: dict[str, dict]) -> None:
    ref = reference[name]
    scale = max(1.0, max(p.abs().max().item() for p in ref["params"].values()))
    moved, _ = _max_diff(ref["params"], ref["init"])
    assert moved > 1e-3, f"{name}: training did not move the parameters ({moved:.2e})"
    for r, res in enumerate(ranks):
        got = res[f"{name}/{how}"]
        assert sorted(got["params"]) == sorted(ref["params"]), f"rank {r}: parameter names differ"
        for n, p in got["params"].items():
            assert p.shape == ref["params"][n].shape and p.dtype == ref["params"][n].dtype, n
        diff, worst = _max_diff(got["params"], ref["params"])
        assert diff <= 1e-5 * scale, f"{name}/{how} rank {r}: {worst} differs by {diff:.3e} (scale {scale:.2f})"
        assert sorted(got["buffers"]) == sorted(ref["buffers"])
        for n, b in got["buffers"].items():
            assert torch.equal(b, ref["buffers"][n]), f"buffer {n}"
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-9, abs=1e-12)
    # every rank holds the same model after each step's all-reduce
    for n, p in ranks[0][f"{name}/{how}"]["params"].items():
        assert torch.equal(p, ranks[1][f"{name}/{how}"]["params"][n]), f"ranks disagree on {n}"


def test_ranks_without_gradient_exchange_do_not_match(ranks: list[dict], reference: dict[str, dict]) -> None:
    """The control: the comparison above tells shard-wise training from data-parallel training."""
    for r, res in enumerate(ranks):
        diff, _ = _max_diff(res["itnet/alone"]["params"], reference["itnet"]["params"])
        assert diff > 1e-3, f"rank {r} alone ends within {diff:.2e} of the one-process run"


def test_a_raising_rank_fails_the_run() -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(RankFailed) as err:
        launch({"fail_rank": 1, "scenarios": [], "bundles": {}}, Path(tmp), timeout=120)
    assert err.value.codes[1] == 1, err.value.codes  # rank 0 fails too when rank 1 goes away, or is killed
    assert "RuntimeError: rank 1 fails on purpose" in str(err.value)


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
