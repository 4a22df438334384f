"""tlc: make trained PyTorch networks shallower and faster, exactly where it is lossless."""

from tlc import measure
from tlc.errors import MergeError, SpecError, TLCError, TraceError, UnknownSiteError, VerificationError
from tlc.graph import Graph, Segment, Site, find_sites, trace
from tlc.io.export import export_onnx
from tlc.measure import compare
from tlc.surgery.linearize import linearize
from tlc.surgery.merge import merge

__version__ = "0.1.0"

__all__ = [
    "Graph", "MergeError", "Segment", "Site", "SpecError", "TLCError", "TraceError", "UnknownSiteError",
    "VerificationError", "__version__", "compare", "export_onnx", "find_sites", "linearize", "measure", "merge",
    "trace",
]
