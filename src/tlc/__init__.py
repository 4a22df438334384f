"""tlc: make trained PyTorch networks shallower and faster, exactly where it is lossless."""

from tlc.errors import MergeError, SpecError, TLCError, TraceError, VerificationError

__version__ = "0.1.0"

__all__ = ["MergeError", "SpecError", "TLCError", "TraceError", "VerificationError", "__version__"]
