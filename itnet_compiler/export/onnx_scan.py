"""The ONNX body of an exact ``ssm`` transform: a ``Scan`` over time (written in the next step)."""

from __future__ import annotations

import onnx

from ..errors import ItnetError
from ..ir.core import Node


def emit(node: Node, ins: list[str], outs: list[str], opset: int) -> list[onnx.NodeProto]:
    raise ItnetError("ssm export is not written yet", layer=node.layer or None)
