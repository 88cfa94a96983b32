"""torch model -> TVM Relax -> our sparse TensorIR kernels -> library, checked against torch."""

from __future__ import annotations

from compile._build import CompiledModel, build, compare_outputs, runs_on_host
from compile.errors import CompileError, OutputMismatch

__all__ = [
    "CompileError",
    "CompiledModel",
    "OutputMismatch",
    "build",
    "compare_outputs",
    "runs_on_host",
]
