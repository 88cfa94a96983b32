"""Exceptions raised by `compile`."""

from __future__ import annotations


class CompileError(RuntimeError):
    """A model could not be exported, rewritten or built for the profile's target."""


class OutputMismatch(CompileError):
    """The built library's output differs from torch's on the example input."""
