"""Torch backend: FX code generation and the torch lowerings."""
