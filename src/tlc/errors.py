"""Exceptions raised by tlc. Every one names what it refers to and why."""

from __future__ import annotations


class TLCError(Exception):
    """Base class of every error tlc raises on purpose."""


class TraceError(TLCError):
    """The model cannot be traced or analysed (names the module and the reason)."""


class MergeError(TLCError):
    """A merge was refused because it could not be done exactly."""


class VerificationError(MergeError):
    """The deploy form does not compute the same function as the training form."""


class SpecError(TLCError, ValueError):
    """A model, data or option specification is malformed or points at nothing."""


class UnknownSiteError(TLCError, KeyError):
    """A site name that the model does not have (the message suggests close names)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
