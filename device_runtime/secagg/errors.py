"""Errors of secure aggregation shared by both sides."""

from __future__ import annotations


class SecAggError(Exception):
    """A protocol message that is malformed or inconsistent; the message says what."""


class SecAggAborted(SecAggError):
    """The session was aborted (by this party or the other); nothing more will be summed."""
