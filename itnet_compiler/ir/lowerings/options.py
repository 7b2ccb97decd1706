"""Typed options of the lowerings that take any: one frozen record each, shared by every backend.

Each field says its type, default, bounds and (``tune``) the space a tuner searches; ``Options.make`` builds one
from spec keywords with one ItnetError naming the layer on a bad key or value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..fields import Options, option

MC_MODES = ("per_row", "shared")
MC_PROPOSALS = ("uniform", "norm", "lowrank", "probe")
ATTENTION_METHODS = ("favor", "nystrom", "learned")
CONV_METHODS = ("svd", "spatial", "cp", "learned")


@dataclass(frozen=True)
class MonteCarloOptions(Options):
    """Importance sampling of the j-sum (``dot_exp`` and ``stationary``)."""

    lowering: ClassVar[str] = "montecarlo"
    samples: int = option(64, "M, sampled columns (taps) per row", lo=2, tune=(8, 4096))
    mode: str = option("per_row", "per_row: a draw per row; shared: one draw per (batch, head)", choices=MC_MODES,
                       tune=MC_MODES)  # fmt: skip
    proposal: str = option("norm", "uniform | norm (‖k_j‖·‖v_j‖) | lowrank (random features of K^temper) | probe "
                           "(query-aware: the exact rows of a few probe rows per group of rows)",
                           choices=MC_PROPOSALS, tune=MC_PROPOSALS)  # fmt: skip
    seed: int = option(0, "seed of the draw (reproducible)", lo=0)
    rank: int = option(16, "features of the lowrank-guided proposal", lo=1, tune=(4, 64))
    temper: float = option(0.0, "lowrank proposal ∝ K^temper; 0: a power its features resolve", lo=0.0, hi=1e6)
    defensive: float = option(0.1, "uniform share of a non-uniform proposal (bounds every weight)", lo=1e-6, hi=1.0)
    block: int = option(0, "rows per tile; 0: sized to keep gathered samples near 2^24 elements", lo=0)
    group: int = option(64, "probe: rows that share one proposal", lo=1, tune=(16, 256))
    probes: int = option(2, "probe: rows per group scored exactly against every column", lo=1, hi=64, tune=(1, 8))
    checks: int = option(32, "rows computed exactly to check the error estimate (0: variance only)", lo=0, hi=4096)


@dataclass(frozen=True)
class HybridOptions(Options):
    """Exact key blocks chosen per query block by probe rows, the uncovered rest importance-sampled (``dot_exp``)."""

    lowering: ClassVar[str] = "hybrid"
    block: int = option(64, "rows of a query block and columns of a key block", choices=(16, 32, 64, 128, 256),
                        tune=(32, 64, 128))  # fmt: skip
    blocks: int = option(16, "most key blocks computed exactly per query block (diagonal, sinks, local included)",
                         lo=1, tune=(4, 256))  # fmt: skip
    mass: float = option(0.99, "keep blocks while the probes' mass they cover is below this (1: always `blocks`)",
                         lo=0.0, hi=1.0, tune=(0.8, 1.0))  # fmt: skip
    samples: int = option(64, "M, columns sampled per query block from the uncovered blocks", lo=2, tune=(16, 1024))
    probes: int = option(2, "rows per query block scored exactly against every key (block ranking, proposal)",
                         lo=1, hi=256, tune=(1, 8))  # fmt: skip
    checks: int = option(2, "rows per query block held out from every choice and scored exactly: their measured "
                         "error is part of the estimate", lo=0, hi=256)  # fmt: skip
    sinks: int = option(1, "leading key blocks always kept", lo=0)
    local: int = option(1, "key blocks before the diagonal always kept", lo=0)
    defensive: float = option(0.2, "uniform share of the proposal over the uncovered columns", lo=1e-6, hi=1.0)
    values: str = option("pooled", "pooled: a sample carries its block's mean value (far less variance where the "
                         "remainder is spread, biased where it is peaked); sampled: its own (unbiased)",
                         choices=("sampled", "pooled"), tune=("sampled", "pooled"))  # fmt: skip
    seed: int = option(0, "seed of the probes and the samples", lo=0)


@dataclass(frozen=True)
class LowRankOptions(Options):
    """A rank-r factorisation of an attention kernel."""

    lowering: ClassVar[str] = "lowrank"
    method: str = option("favor", "favor (positive random features) | nystrom | learned (fitted φ, ψ)",
                         choices=ATTENTION_METHODS, tune=ATTENTION_METHODS)  # fmt: skip
    rank: int = option(64, "r: features, or landmarks for nystrom", lo=1, tune=(8, 512))
    seed: int = option(0, "seed of the features or landmarks", lo=0)
    landmarks: str = option("strided", "nystrom: strided | random", choices=("strided", "random"))
    chunk: int = option(256, "causal: rows per chunk of the prefix-sum evaluation", lo=1, tune=(32, 1024))
    local: int = option(1, "causal: 1 = the diagonal chunks exactly, 0 = everything factorised", lo=0, hi=1)
    steps: int = option(100, "learned: Adam steps", lo=1)
    lr: float = option(0.02, "learned: Adam learning rate", lo=1e-12, hi=1e3)
    calib: int = option(512, "learned: at most this many columns (and 1/4 as many rows) of calibration data", lo=1)
    loss: str = option("weights", "learned: distil the attention weights (cross-entropy, as Hedgehog) or the outputs",
                       choices=("weights", "outputs"))  # fmt: skip


@dataclass(frozen=True)
class ConvLowRankOptions(Options):
    """A low-rank factorisation of a convolution's weight."""

    lowering: ClassVar[str] = "lowrank"
    method: str = option("svd", "svd (channels) | spatial | cp (ALS) | learned", choices=CONV_METHODS,
                         tune=CONV_METHODS)  # fmt: skip
    rank: int = option(8, "r per group", lo=1, tune=(1, 256))
    iters: int = option(60, "cp: ALS sweeps", lo=1)
    seed: int = option(0, "cp: start; learned: which calibration points", lo=0)
    calib: int = option(4096, "learned: at most this many output points of calibration data", lo=1)


@dataclass(frozen=True)
class ChunkedOptions(Options):
    """SSD: dense within chunks, the state passed between them."""

    lowering: ClassVar[str] = "chunked"
    chunk: int = option(64, "rows per chunk (unset: the source model's chunk_size)", lo=1, tune=(16, 256))
    budget: float = option(float(1 << 24), "most elements of the decay matrices held at once", lo=1.0)
