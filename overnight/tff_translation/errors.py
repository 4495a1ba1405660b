"""The one error translation raises (TensorFlow-free, so `overnight` can re-export it)."""

from __future__ import annotations


class NotTranslatable(ValueError):
    """A TFF or Keras object that Overnight cannot run exactly as TFF would.

    The message names the object and lists what is supported instead.
    """

    def __init__(self, what: object, why: str, supported: str) -> None:
        super().__init__(f"{describe(what)}: {why}; supported: {supported}")


def describe(what: object) -> str:
    """A user-recognisable name for an object: its class, or its repr for plain values."""
    if isinstance(what, str | int | float | bool) or what is None:
        return repr(what)
    kind = type(what)
    return f"{kind.__module__}.{kind.__qualname__}"
