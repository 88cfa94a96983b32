"""torch model -> TVM Relax -> our sparse TensorIR kernels -> library, checked against torch."""

from __future__ import annotations

from compile._build import CompiledModel, build, compare_outputs, runs_on_host
from compile.errors import CompileError, OutputMismatch
from compile.export import (
    ArtifactMissing,
    ExportError,
    TrialNotExportable,
    TrialNotFound,
    export_candidate,
)

__all__ = [
    "ArtifactMissing",
    "CompileError",
    "CompiledModel",
    "ExportError",
    "OutputMismatch",
    "TrialNotExportable",
    "TrialNotFound",
    "build",
    "compare_outputs",
    "export_candidate",
    "runs_on_host",
]
