"""tlc: make trained PyTorch networks shallower and faster, exactly where it is lossless."""

from tlc.errors import MergeError, SpecError, TLCError, TraceError, VerificationError
from tlc.graph import Graph, Segment, Site, find_sites, trace
from tlc.surgery.linearize import linearize
from tlc.surgery.merge import merge

__version__ = "0.1.0"

__all__ = [
    "Graph", "MergeError", "Segment", "Site", "SpecError", "TLCError", "TraceError", "VerificationError",
    "__version__", "find_sites", "linearize", "merge", "trace",
]
