"""tlc: make trained PyTorch networks shallower and faster, exactly where it is lossless."""

from tlc import measure, train
from tlc.compression import CompressionResult, compress
from tlc.errors import MergeError, SpecError, TLCError, TraceError, UnknownSiteError, VerificationError
from tlc.graph import Graph, Segment, Site, find_sites, trace
from tlc.io.export import export_onnx
from tlc.io.recipe import load, save
from tlc.measure import compare
from tlc.surgery.linearize import linearize
from tlc.surgery.merge import merge

__version__ = "0.1.0"

__all__ = [
    "Graph", "MergeError", "Segment", "Site", "SpecError", "TLCError", "TraceError", "UnknownSiteError",
    "VerificationError", "CompressionResult", "__version__", "compare", "compress", "export_onnx", "find_sites",
    "linearize", "load", "measure", "merge", "save", "trace", "train",
]
