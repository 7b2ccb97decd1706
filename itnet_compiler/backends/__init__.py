"""Backends: Program -> runnable module or artefact."""
