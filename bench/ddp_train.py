"""Data-parallel training of an ITNet model or a converted BERT with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node=2 bench/ddp_train.py --model itnet --steps 20             # CPU, gloo
    torchrun --nproc_per_node=2 bench/ddp_train.py --model bert --steps 20              # a converted BertModel
    torchrun --nproc_per_node=8 bench/ddp_train.py --model bert --backend nccl          # one machine, 8 GPUs

(``torchrun --standalone ...`` picks a free port, for several runs on one machine at once.)

Several machines (the same command on each; HOST:PORT is one of them, reachable from all):

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=itnet \\
        bench/ddp_train.py --model bert --backend nccl --steps 200

``--model itnet``: a linear embedding, two native ``itnet_compiler.nn.IntegralTransform`` layers and a classification
head (eager PyTorch; ``--convert`` converts it and trains the module ``itc.build`` makes). ``--model bert``: a small
transformers BertModel (from a config, offline) converted by ``itc.convert`` with a dynamic batch, built by
``itc.build(prog, backend=--build)``, with a linear head on its pooler output. Every rank builds the same model from
``--seed``; ``--wrap ddp`` (DistributedDataParallel) or ``fsdp`` (``torch.distributed.fsdp.fully_shard``) wraps it.

Each step's global batch (``--batch`` examples of a synthetic classification task) is drawn from ``--seed`` and the
step number and split into contiguous shards, one per rank, so a run's losses and final parameters depend on the
world size only through the order of the reductions: the final checksum of a 1-process and a 2-process run agree to
rounding (exactly-equal inputs, ``--dtype float64`` makes it visible). Rank 0 prints the global mean loss per step
and the checksum (sum and sum of |p| over all parameters, in float64); every rank's checksum is compared, and the
script exits non-zero when they differ.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import itnet_compiler as itc  # noqa: E402
from itnet_compiler.nn import IntegralTransform  # noqa: E402

CLASSES = 3
FEATURES = 4
VOCAB = 256


class ItnetNet(nn.Module):
    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, dim)
        self.layers = nn.ModuleList(IntegralTransform(dim, heads=4, hidden=32, seed=i) for i in range(layers))
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(h.mean(1))


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, dim: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(ids).pooler_output)


def global_batch(args, step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's whole batch, the same on every rank: a label every model here can learn."""
    gen = torch.Generator().manual_seed(args.seed * 100003 + step)
    if args.model == "bert":
        ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen)
        return ids, (ids < VOCAB // 2).sum(1).mul(CLASSES).div(args.seq + 1, rounding_mode="floor")
    x = torch.randn(args.batch, args.seq, FEATURES, generator=gen, dtype=dtype)
    w = torch.tensor([[1.0, -1.0, 0.5], [0.5, 1.0, -1.0], [-1.0, 0.5, 1.0], [0.2, 0.2, 0.2]], dtype=dtype)
    return x, (x.mean(1) @ w).argmax(1)


def make_model(args, dtype: torch.dtype, local: int) -> nn.Module:
    torch.manual_seed(args.seed)
    batch = torch.export.Dim("batch", min=1, max=max(2, args.batch))
    if args.model == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=args.dim, num_hidden_layers=args.layers, num_attention_heads=4,
                         intermediate_size=4 * args.dim, vocab_size=VOCAB, max_position_embeddings=max(64, args.seq),
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        bert = BertModel(cfg).to(dtype).eval()
        ids = torch.randint(0, VOCAB, (local, args.seq))
        prog = itc.convert(bert, (ids,), dynamic_shapes={"input_ids": {0: batch}})
        torch.manual_seed(args.seed + 1)  # the head's init must not depend on how much the conversion drew
        return Classifier(itc.build(prog, backend=args.build), args.dim).to(dtype)
    net = ItnetNet(args.dim, args.layers).to(dtype)
    if args.convert:
        x = torch.randn(local, args.seq, FEATURES, dtype=dtype)
        net = itc.build(itc.convert(net, (x,), dynamic_shapes={"x": {0: batch}}), backend=args.build)
    return net


def wrap(model: nn.Module, args, device: torch.device) -> nn.Module:
    if args.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for t in [*model.parameters(), *model.buffers()]:  # rank 0's initial model everywhere, as DDP does itself
        dist.broadcast(t.data, 0)
    # Per layer only where the forward calls the layers as modules: a built module's generated graph reads every
    # parameter itself, so only the whole built module can be one FSDP unit.
    if args.model == "itnet" and not args.convert:
        for layer in model.layers:
            fully_shard(layer)
    fully_shard(model)
    return model


def checksum(model: nn.Module) -> torch.Tensor:
    """[sum p, sum |p|, count] over every parameter (gathered whole under FSDP), in float64."""
    from torch.distributed.tensor import DTensor

    out = torch.zeros(3, dtype=torch.float64)
    for _, p in sorted(model.named_parameters()):
        t = (p.full_tensor() if isinstance(p, DTensor) else p).detach().double().cpu()
        out += torch.stack([t.sum(), t.abs().sum(), torch.tensor(float(t.numel()), dtype=torch.float64)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("itnet", "bert"), default="itnet")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="global batch; a multiple of the world size")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--optim", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--wrap", choices=("ddp", "fsdp"), default="ddp")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl with CUDA, else gloo")
    ap.add_argument("--build", default="torch", help="itc.build backend (torch, or triton on a GPU)")
    ap.add_argument("--convert", action="store_true", help="--model itnet: train the converted and built module")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not a multiple of the world size {world}")
    per = args.batch // world
    dtype = getattr(torch, args.dtype)
    say = print if rank == 0 else (lambda *a, **k: None)

    t0 = time.perf_counter()
    model = wrap(make_model(args, dtype, per).to(device), args, device)
    n_params = sum(p.numel() for p in model.parameters())  # whole tensors under FSDP too (DTensor.numel)
    say(f"model {args.model}{' (built)' if args.model == 'bert' or args.convert else ''}, {args.wrap}, {backend} on "
        f"{device.type}, world {world}, global batch {args.batch} ({per} per rank), seq {args.seq}, {args.dtype}, "
        f"{args.optim} lr {args.lr}; {n_params} parameters; set up in {time.perf_counter() - t0:.1f} s",
        flush=True)  # fmt: skip
    opt_cls = torch.optim.AdamW if args.optim == "adamw" else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=args.lr)

    t_train = time.perf_counter()
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        x, y = global_batch(args, step, dtype)
        x, y = x[rank * per : (rank + 1) * per].to(device), y[rank * per : (rank + 1) * per].to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        mean = loss.detach().double().reshape(1)
        dist.all_reduce(mean)  # the mean of the shards' means: the global batch's mean loss
        say(f"step {step:4d}  loss {mean.item() / world:.6f}  ({(time.perf_counter() - t) * 1e3:.1f} ms)", flush=True)
    elapsed = time.perf_counter() - t_train

    local = checksum(model).to(device)
    every = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(every, local)
    agree = all(torch.equal(every[0], c) for c in every)
    s, a, n = local.tolist()
    say(f"checksum sum={s:.12e} abs={a:.12e} params={int(n)}  ranks agree: {agree}  "
        f"({elapsed / max(1, args.steps) * 1e3:.1f} ms/step)", flush=True)  # fmt: skip
    # torch 2.13 + gloo: exiting with a DDP/FSDP module still alive aborts about half the time ("terminate called
    # without an active exception"); drop it first.
    del model, opt
    gc.collect()
    dist.destroy_process_group()
    if not agree:
        raise SystemExit("ranks ended with different parameters")


if __name__ == "__main__":
    main()
