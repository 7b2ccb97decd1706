"""Lowering records of the recurrent families ``ssm`` and ``gated``. No cost rules yet: ``auto`` takes the target's
exact default for them."""

from __future__ import annotations

from ..lowering import register_lowering
from .options import ChunkedOptions

register_lowering("ssm", "dense", exact=True, doc="the whole causal kernel at once (one chunk; the oracle)")(None)
register_lowering("ssm", "scan", exact=True, doc="sequential in time, parallel over batch × heads × state")(None)
register_lowering(
    "ssm", "chunked", exact=True, options=ChunkedOptions, doc="SSD: dense within chunks, the state passed between"
)(None)
register_lowering("gated", "scan", exact=True, doc="the cell loop, one step per time, every layer and direction")(None)
register_lowering("gated", "library", exact=True, doc="torch's fused RNN (cuDNN on a GPU)")(None)
