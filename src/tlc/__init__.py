"""tlc: make trained PyTorch networks shallower and faster, exactly where it is lossless."""

from tlc import measure, train
from tlc.edits import Edit, Linearize, WeightMask, register_edit
from tlc.errors import MergeError, SpecError, TLCError, TraceError, UnknownSiteError, VerificationError
from tlc.graph import Graph, Segment, Site, find_sites, trace
from tlc.io.export import export_onnx
from tlc.io.recipe import load, save
from tlc.measure import compare
from tlc.methods.base import Method, NoCandidate, Proposal, available_methods, register_method
from tlc.run.benchmark import BenchmarkResult, benchmark
from tlc.run.config import RunConfig, RunContext
from tlc.run.loop import CompressionResult, compress
from tlc.surgery.learnable import MakeLearnable  # noqa: F401 - registers the learnable edits for tlc.load
from tlc.surgery.linearize import linearize
from tlc.surgery.merge import merge

__version__ = "0.2.0"

__all__ = [
    "BenchmarkResult", "CompressionResult", "Edit", "Graph", "Linearize", "MergeError", "Method", "NoCandidate",
    "Proposal", "RunConfig", "RunContext", "Segment", "Site", "SpecError", "TLCError", "TraceError",
    "UnknownSiteError", "VerificationError", "WeightMask", "__version__", "available_methods", "benchmark", "compare",
    "compress", "export_onnx", "find_sites", "linearize", "load", "measure", "merge", "register_edit",
    "register_method", "save", "trace", "train",
]
