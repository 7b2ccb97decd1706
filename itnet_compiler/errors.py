"""The one exception type users see: a single sentence naming the layer, the op and what to do."""

from __future__ import annotations


class ItnetError(Exception):
    """A user-facing error; ``str(err)`` is one line."""

    def __init__(self, message: str, *, layer: str | None = None, op: str | None = None):
        parts = []
        if layer:
            parts.append(f"layer '{_escaped(layer)}'")
        if op:
            parts.append(f"op `{_escaped(op)}`")
        prefix = (", ".join(parts) + ": ") if parts else ""
        super().__init__(prefix + " ".join(message.split()))
        self.layer = layer
        self.op = op


def _escaped(name: str) -> str:
    """A name as one line: control characters (a newline in a layer name from a hostile bundle) escaped."""
    name = str(name)
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


class ParseError(ItnetError):
    """Malformed IR text; the message carries line and column."""

    def __init__(self, message: str, line: int, col: int):
        super().__init__(f"line {line}, column {col}: {message}")
        self.line = line
        self.col = col


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
