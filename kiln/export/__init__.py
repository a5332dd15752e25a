"""Standalone artifacts of compiled graphs: ``export`` a model to a file, ``load_exported`` it
anywhere Kiln is installed, without the model's code."""

from kiln.export.artifact import FORMAT, FORMAT_VERSION, export, load_exported
from kiln.export.graph_json import InvalidArtifact
from kiln.export.program import ExportedProgram, InputSpec

__all__ = ["export", "load_exported", "ExportedProgram", "InputSpec", "InvalidArtifact",
           "FORMAT", "FORMAT_VERSION"]
