"""Triton backend: kernels rendered from templates, loaded from a cache of generated files."""
