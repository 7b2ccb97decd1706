"""Passes: Program -> Program, listed in order in pipeline.py."""
