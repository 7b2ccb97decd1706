"""The one exception type users see: a single sentence naming the layer, the op and what to do."""

from __future__ import annotations


class ItnetError(Exception):
    """A user-facing error; ``str(err)`` is one line."""

    def __init__(self, message: str, *, layer: str | None = None, op: str | None = None):
        parts = []
        if layer:
            parts.append(f"layer '{layer}'")
        if op:
            parts.append(f"op `{op}`")
        prefix = (", ".join(parts) + ": ") if parts else ""
        super().__init__(prefix + " ".join(message.split()))
        self.layer = layer
        self.op = op


class ParseError(ItnetError):
    """Malformed IR text; the message carries line and column."""

    def __init__(self, message: str, line: int, col: int):
        super().__init__(f"line {line}, column {col}: {message}")
        self.line = line
        self.col = col
